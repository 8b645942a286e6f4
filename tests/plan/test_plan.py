"""sidfast.plan.memory: static bytes against real CPU runs, activations against a real step, published sizes."""
import math

import pytest
import torch

from sidfast.plan import activations as A
from sidfast.plan import known as K
from sidfast.plan import memory as P
from sidfast.plan import static as S
from sidfast.training.config import TrainConfig
from sidfast.models.lora import add_lora, lora_parameters
from sidfast.training.networks import build_networks
from utils import join_gloo_group, spawn_workers, tiny_diffusers_unet

diffusers = pytest.importorskip("diffusers")


def tiny_teacher(seed=0):
    """A diffusers UNet2DModel (convolutions, attention linears, a time MLP) as a VP teacher, 8x8 RGB."""
    from sidfast.models.denoiser import DiffusersDenoiser
    from sidfast.schedules import VPSchedule

    return DiffusersDenoiser(tiny_diffusers_unet(seed=seed), VPSchedule.from_diffusers(diffusers.DDPMScheduler()),
                             "epsilon")


def _storages(tensors) -> dict:
    return {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors}


def test_known_models_have_their_published_sizes_on_meta():
    for name, spec in K.KNOWN_MODELS.items():
        net = K.KnownDenoiser(name)
        params = list(net.parameters())
        assert all(p.is_meta for p in params)
        n = sum(p.numel() for p in params)
        assert abs(n - spec.published_params) <= 0.02 * spec.published_params, (name, n)


@pytest.mark.parametrize("fake_score", ["full", "lora"])
def test_static_bytes_equal_a_real_step(fake_score):
    """What the trainer holds after one Adam step (teacher, generator, EMA, fake score: weights, buffers,
    gradients, exp_avg, exp_avg_sq, step) is exactly the plan's total, each storage counted once."""
    cfg = TrainConfig(fake_score=fake_score, lora_rank=4, image_shape=(3, 8, 8))
    nets = build_networks(cfg, tiny_teacher(), None, None, torch.device("cpu"))
    opts = [torch.optim.Adam(nets.trainable(n), lr=1e-3) for n in (nets.generator, nets.fake)]
    x = torch.randn(2, 3, 8, 8)
    sigma = torch.full((2,), 1.0)
    for net, opt in zip((nets.generator, nets.fake), opts):
        net(x, sigma).square().mean().backward()
        opt.step()
    tensors = [t for n in (nets.teacher, nets.generator, nets.generator_ema, nets.fake)
               for t in (*n.parameters(), *n.buffers())]
    tensors += [p.grad for opt in opts for g in opt.param_groups for p in g["params"]]
    tensors += [v for opt in opts for s in opt.state.values() for v in s.values()]
    measured = sum(_storages(tensors).values())
    for precision in ("fp32", "bf16"):  # autocast keeps fp32 weights: the same bytes
        plan = P.plan_memory(tiny_teacher(), sharding="ddp", precision=precision, fake_score=fake_score,
                             lora_rank=4, measure_device="meta")
        assert sum(n.total for n in plan.networks) == measured
        assert plan.static == measured


def test_lora_shapes_are_those_add_lora_creates():
    teacher = tiny_teacher()
    for rank in (1, 4, 64):  # 64: clamped to each layer's smaller side
        made = [tuple(p.shape) for p in lora_parameters(add_lora(teacher, rank))]
        assert S.lora_parameter_shapes(teacher, rank) == made


def test_fsdp_divides_every_sharded_tensor():
    assert S.shard_numel((10, 3), 4, "fsdp") == 3 * 3
    assert S.shard_numel((10, 3), 4, "ddp") == 30
    assert S.shard_numel((), 8, "fsdp") == 1
    teacher = tiny_teacher()
    one = P.plan_memory(teacher, gpus=1, sharding="fsdp", precision="fp32")
    many = P.plan_memory(teacher, gpus=4, sharding="fsdp", precision="fp32")
    rows = sum(math.ceil(p.shape[0] / 4) * math.prod(p.shape[1:]) for p in teacher.parameters())
    buffers = sum(b.numel() * b.element_size() for b in teacher.buffers())
    assert many.networks[0].weights == 4 * rows + buffers
    assert many.networks[1].adam == 8 * rows + S.ADAM_STEP_BYTES * len(list(teacher.parameters()))
    assert many.networks[1].weights - buffers < (one.networks[1].weights - buffers) / 4 * 1.2
    ddp = P.plan_memory(teacher, gpus=4, sharding="ddp", precision="fp32")
    assert ddp.ddp_buckets == sum(n.grads for n in ddp.networks) > 0


def _real_generator_step_saved_bytes(nets, batch, resolution):
    """Bytes autograd saves in one real generator step on the CPU (the trainer's ``_generator_loss``): each
    storage once, weights and buffers left out; CPU attention is PyTorch's own kernel, not the plan's."""
    exclude = {t.untyped_storage()._cdata for n in (nets.teacher, nets.generator, nets.fake)
               for t in (*n.parameters(), *n.buffers())}
    saved = {}

    def pack(t):
        k = t.untyped_storage()._cdata
        if k not in exclude:
            saved[k] = t
        return t

    z = torch.randn(batch, 3, resolution, resolution)
    sigma = torch.full((batch,), 2.5)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        x_g = nets.generator(2.5 * z, sigma)
        x_t = x_g + sigma.view(-1, 1, 1, 1) * torch.randn_like(x_g)
        y_real = nets.teacher(x_t, sigma)
        y_fake = nets.fake(x_t, sigma)
        loss = ((y_real - y_fake) * (y_fake - x_g)).mean()
    loss.backward()
    return sum(t.untyped_storage().nbytes() for t in saved.values())


@pytest.mark.parametrize("fake_score", ["full", "lora"])
def test_activation_extrapolation_within_15_percent_of_a_real_step(fake_score):
    """Measured from batch 2 and 3 at 8x8 on the CPU, extrapolated to batch 4 at 16x16; and measured on the
    meta device at 16x16: both within 15% of one real generator step at batch 4, 16x16."""
    teacher = tiny_teacher()
    cfg = TrainConfig(fake_score=fake_score, lora_rank=4, image_shape=(3, 16, 16))
    nets = build_networks(cfg, teacher, None, None, torch.device("cpu"))
    real = _real_generator_step_saved_bytes(nets, batch=4, resolution=16)
    common = dict(batch=4, resolution=16, sharding="ddp", precision="fp32", fake_score=fake_score,
                  lora_rank=4)
    scaled = P.plan_memory(teacher, measure_device="cpu", measure_resolution=8, **common)
    meta = P.plan_memory(teacher, measure_device="meta", **common)
    for plan in (scaled, meta):
        fixed, per_sample = plan.activations["generator step"]
        predicted = fixed + 4 * per_sample
        assert abs(predicted - real) <= 0.15 * real, (predicted, real)


def test_checkpointing_keeps_less_and_the_largest_batch_is_the_largest_that_fits():
    teacher = tiny_teacher()
    common = dict(resolution=32, sharding="ddp", precision="fp32", gpu_memory="3GiB", margin=0.1)
    plain = P.plan_memory(teacher, **common)
    ckpt = P.plan_memory(teacher, checkpointing=True, **common)
    for phase in plain.activations:
        assert 0 < ckpt.activations[phase][1] < plain.activations[phase][1]
    for plan in (plain, ckpt):
        b = plan.max_batch
        assert b >= 1
        assert max(plan.phase_bytes(ph, b) for ph in plan.activations) <= plan.usable
        assert max(plan.phase_bytes(ph, b + 1) for ph in plan.activations) > plan.usable
    assert ckpt.max_batch > plain.max_batch


def test_flash_attention_stand_in_matches_sdpa_in_float64():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    out = A._FlashAttention.apply(q, k, v, None, 0.0, False, None)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_units_follow_diffusers_checkpointing():
    net = K.KnownDenoiser("sd1.5").net
    units = A.checkpoint_units(net)
    kinds = {type(u).__name__ for u in units}
    assert kinds == {"ResnetBlock2D", "BasicTransformerBlock"}
    assert len([u for u in units if type(u).__name__ == "ResnetBlock2D"]) == 22  # 8 down, 2 mid, 12 up


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="argument model"):
        P.plan_memory(model="sd9")
    with pytest.raises(ValueError, match="argument resolution"):
        P.plan_memory(model="sd1.5")
    with pytest.raises(ValueError, match="argument sharding fsdp"):
        P.plan_memory(model="sd1.5", resolution=512, precision="bf16-params", sharding="ddp")
    with pytest.raises(ValueError, match="gpu_memory"):
        P.parse_memory("lots")
    assert P.parse_memory("80GB") == 80 * P.GIB
    assert P.parse_memory("512MiB") == 512 * 1024 ** 2


def test_cli_plan_prints_the_breakdown_and_rejects_bad_options(capsys):
    from sidfast.cli import main

    assert main(["plan", "--teacher", "test_plan:tiny_teacher", "--resolution", "16", "--batch", "2",
                 "--precision", "fp32", "--fake-score", "lora", "--lora-rank", "4", "--checkpointing"]) == 0
    out = capsys.readouterr().out
    assert "fake score lora" in out and "checkpointing on" in out
    assert "fits; largest batch per GPU" in out
    for argv, message in ((["--model", "sd1.5"], "argument --resolution"),
                          (["--model", "sd1.5", "--resolution", "512", "--gpu-memory", "lots"],
                           "--gpu-memory"),
                          (["--model", "sd1.5", "--resolution", "500"], "multiple of 16"),
                          (["--model", "sd1.5", "--resolution", "512", "--precision", "bf16-params"],
                           "--sharding fsdp")):
        with pytest.raises(SystemExit) as exc:
            main(["plan", *argv])
        assert exc.value.code == 2
        assert message in capsys.readouterr().err


def test_readme_table_rows_are_what_plan_table_prints():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    rows = P.predictions_table(models=("sd1.5",), resolutions=(512,)).splitlines()
    assert rows[0] in readme
    for row in rows[4:]:
        assert row in readme, "README's plan table is stale: paste the output of `sidfast plan --table`"


def _fsdp_worker(rank, init_file, out_dir, world):
    import os

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    join_gloo_group(rank, world, init_file)
    try:
        from test_plan import _storages, tiny_teacher

        cfg = TrainConfig(image_shape=(3, 8, 8))
        nets = build_networks(cfg, tiny_teacher(), None, None, torch.device("cpu"))
        for net in (nets.teacher, nets.generator, nets.generator_ema, nets.fake):
            fully_shard(net)
        opts = [torch.optim.Adam(nets.trainable(n), lr=1e-3) for n in (nets.generator, nets.fake)]
        for net, opt in zip((nets.generator, nets.fake), opts):
            net(torch.randn(2, 3, 8, 8), torch.ones(2)).square().mean().backward()
            opt.step()
        tensors = [t for n in (nets.teacher, nets.generator, nets.generator_ema, nets.fake)
                   for t in (*n.parameters(), *n.buffers())]
        tensors += [p.grad for opt in opts for g in opt.param_groups for p in g["params"]]
        tensors += [v for opt in opts for s in opt.state.values() for v in s.values()]
        local = [t._local_tensor if isinstance(t, DTensor) else t for t in tensors]
        torch.save(sum(_storages(local).values()), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_fsdp2_per_rank_bytes_of_a_real_two_process_run(tmp_path):
    """``fully_shard`` over 2 gloo processes: rank 0 (the largest shards) holds exactly the plan's bytes."""
    spawn_workers(_fsdp_worker, (str(tmp_path / "init"), str(tmp_path), 2), 2)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    plan = P.plan_memory(tiny_teacher(), gpus=2, sharding="fsdp", precision="fp32")
    assert per_rank[0] == plan.static
    assert per_rank[1] <= plan.static


def test_plan_of_a_tiny_model_uses_a_unit_that_shows_it_and_keeps_its_columns():
    from nets import tiny_teacher

    text = P.plan_memory(tiny_teacher(), resolution=4, batch=1).format()
    lines = text.splitlines()
    assert lines[1].startswith("KiB per GPU")
    table = [line for line in lines[1:] if not line.startswith("peak")]
    assert len({len(line) for line in table}) == 1, "\n".join(table)  # every row ends in the total column
    totals = [float(line.split()[-1]) for line in table[1:]]
    assert all(t > 0 for t in totals)
    assert "0.00 GiB of" not in text and "KiB of 70.00 GiB usable" in text


def test_plan_table_reports_progress():
    seen = []
    text = P.predictions_table(models=("sd1.5",), resolutions=(512,), progress=seen.append)
    assert seen == ["measuring sd1.5 at 512 px (1/1)"] and "| sd1.5 | 512 |" in text
