"""FSDP2 (``--fsdp``): 2 CPU processes (gloo) against DDP and single-process runs, sharded checkpoints (DCP)
resumed at another number of processes, and the per-rank bytes of a sharded run (a rank killed mid-save: the
rank faults of tests/faults.py).

Why the comparisons are exact: with 2 ranks a gradient is (g0 + g1) / 2 under DDP's all-reduce and FSDP's
reduce-scatter alike (a sum of two terms does not depend on its order, a division by 2 is exact), and FSDP
computes forward and backward with the all-gathered weights, the same numbers as DDP's replicas; Adam and the
EMA update each element on its own, so a shard updates exactly as the full tensor does. One process under
FSDP is the plain single-process run with the same global batch. Every network stays fp32. The exception, a
network holding parameters at its root module: FSDP puts an autograd node on that module's inputs, which
changes the order in which the generator's gradients are summed (docs/runs.md, "FSDP against DDP"); the DDP
run given the same node is FSDP's bit for bit, and without it within gradient rounding.
"""
import math
import os
import sys

import pytest
import torch
import torch.distributed as dist

from utils import (LOSS_SCALE_ULP, gradient_rounding_tolerance, join_gloo_group, spawn_workers,
                   torchrun)

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/: nets.py, runs.py, utils.py


def _cfg(run_dir, **kw):
    """A short run with what users run on: sample grids at the start, every 2 iterations and at the end (the
    EMA generator's and the teacher's forwards outside a training step), checkpoints every 2 iterations."""
    from runs import quiet

    base = dict(run_dir=run_dir, iterations=4, batch=8, lr=1e-3, log_every=1, checkpoint_every=2, lora_rank=4,
                grid_size=4, teacher_steps=2, sample_every=2)
    base.update(kw)
    return quiet(**base)


def _full(net) -> dict:
    """The whole state dict of ``net`` on every rank (all-gathered from the shards under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(net, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().clone() for k, v in sd.items()}


def _full_optim(net, opt) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    sd = get_optimizer_state_dict(net, opt, options=StateDictOptions(full_state_dict=True))
    return {f"{k}.{name}": v.clone() for k, st in sd["state"].items() for name, v in st.items()}


def _teacher(rooted=False):
    """The test teacher; ``rooted``: with a parameter of its root module (FSDP keeps a root's parameters
    gathered after a forward without backward: the case a grid of the EMA generator hits)."""
    from nets import rooted_teacher, tiny_teacher

    return (rooted_teacher if rooted else tiny_teacher)(num_classes=3)


def _run(cfg, rooted=False, **kw):
    from sidfast.training.loop import distill

    res = distill(cfg, _teacher(rooted), log=None, **kw)
    return {"G": _full(res.generator), "ema": _full(res.generator_ema), "fake": _full(res.fake),
            "iteration": res.iteration, "nimg": res.nimg, "interrupted": res.interrupted}


def local_bytes(tensors) -> int:
    """Bytes this rank holds of ``tensors`` (the local shard of a DTensor, all of a plain tensor)."""
    total = 0
    for t in tensors:
        if t is None:
            continue
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


def _bytes(params, opt) -> dict:
    states = [v for p in params for k, v in opt.state[p].items() if k != "step"]
    return {"params": local_bytes(params), "grads": local_bytes([p.grad for p in params]),
            "optimizer": local_bytes(states)}


def _frozen_bytes(trainer) -> dict:
    """Bytes of the teacher's weights on this rank, each storage once (a LoRA fake score shares them)."""
    frozen = [p for net in (trainer.teacher, trainer.fake) for p in net.parameters() if not p.requires_grad]
    seen = {}
    for p in frozen:
        local = p.to_local() if hasattr(p, "to_local") else p
        seen[local.untyped_storage().data_ptr()] = local
    return {"params": local_bytes(seen.values())}


def _trainer_state(cfg):
    """The networks, optimizer states and counters a run restores from ``cfg.resume`` (no iteration run)."""
    from sidfast.utils import runtime
    from sidfast.training.loop import Distiller

    t = Distiller(cfg, _teacher())
    out = {"G": _full(t.generator), "ema": _full(t.generator_ema), "fake": _full(t.fake),
           "opt_g": _full_optim(t.generator, t.opt_g), "opt_fake": _full_optim(t.fake, t.opt_fake),
           "iteration": t.iteration, "nimg": t.nimg}
    runtime.shutdown(t.dist)
    return out


class _InputNode(torch.autograd.Function):
    """The identity, as one autograd node: what FSDP2 puts on the inputs that need gradients of a module
    holding parameters of its own (``RegisterPostBackwardFunction``, at its pre-forward)."""

    @staticmethod
    def forward(ctx, *inputs):
        return tuple(x.view_as(x) for x in inputs)

    @staticmethod
    def backward(ctx, *grads):
        return grads


def _input_node(module, args, kwargs):
    """A forward pre-hook that passes ``module``'s inputs that need gradients through one ``_InputNode``."""
    if not torch.is_grad_enabled():
        return None
    flat = [*args, *kwargs.values()]
    need = [i for i, x in enumerate(flat) if torch.is_tensor(x) and x.requires_grad]
    if not need:
        return None
    for i, x in zip(need, _InputNode.apply(*(flat[i] for i in need))):
        flat[i] = x
    return tuple(flat[:len(args)]), dict(zip(kwargs, flat[len(args):]))


def _two_ranks(rank, init_file, tmp):
    """FSDP and DDP runs, full and LoRA fake score; an FSDP run stopped at iteration 2 (sharded checkpoint);
    a sharded checkpoint written by 1 process, restored here."""
    join_gloo_group(rank, 2, init_file)
    try:
        from sidfast.training.config import TrainConfig

        out = {}
        captured = {}

        def grab(state):  # per-rank bytes after the last update (gradients still held)
            if state["iteration"] == 4:
                trainer = grab.trainer
                captured["G"] = _bytes(trainer.g_params, trainer.opt_g)
                captured["fake"] = _bytes(trainer.fake_params, trainer.opt_fake)
                captured["teacher"] = _frozen_bytes(trainer)

        import sidfast.training.loop as train_mod

        original_init = train_mod.Distiller.__init__

        def init(self, *a, **k):
            original_init(self, *a, **k)
            grab.trainer = self

        train_mod.Distiller.__init__ = init
        for fake_score in ("full", "lora"):
            for mode in ("fsdp", "ddp"):
                run_dir = os.path.join(tmp, f"{mode}-{fake_score}")
                out[f"{mode}-{fake_score}"] = _run(_cfg(run_dir, fsdp=mode == "fsdp", fake_score=fake_score),
                                                   callbacks=[grab])
                out[f"{mode}-{fake_score}-bytes"] = dict(captured)
        train_mod.Distiller.__init__ = original_init
        # a network with parameters of its root module: grids of the EMA generator between the updates; the
        # DDP run again with FSDP's input nodes, and with its loss scale one ulp up
        for mode in ("fsdp", "ddp"):
            out[f"{mode}-rooted"] = _run(_cfg(os.path.join(tmp, f"{mode}-rooted"), fsdp=mode == "fsdp"),
                                         rooted=True)

        def with_input_nodes(self, *a, **k):
            original_init(self, *a, **k)
            for net in (self.teacher, self.fake):
                net.register_forward_pre_hook(_input_node, with_kwargs=True)

        train_mod.Distiller.__init__ = with_input_nodes
        out["ddp-rooted-input-nodes"] = _run(_cfg(os.path.join(tmp, "ddp-rooted-input-nodes")), rooted=True)
        train_mod.Distiller.__init__ = original_init
        from runs import resolved

        nudged = resolved(TrainConfig()).loss_scale_g * LOSS_SCALE_ULP  # the edm recipe's 100, one ulp up
        out["ddp-rooted-nudged"] = _run(_cfg(os.path.join(tmp, "ddp-rooted-nudged"), loss_scale_g=nudged),
                                        rooted=True)
        # stopped at iteration 2 (its sharded checkpoint is what the 1-process run resumes), then resumed here
        part = os.path.join(tmp, "part")
        out["part"] = _run(_cfg(part, fsdp=True), callbacks=[lambda s: s["iteration"] == 2])
        out["part-state"] = _trainer_state(_cfg(part, fsdp=True, resume="auto"))
        same = _cfg(part + "-same", fsdp=True, resume=os.path.join(part, "checkpoint.dcp"))
        out["part-resumed"] = _run(same)
        out["unet"] = _sharded_unet_matches_unsharded()
        torch.save(out, os.path.join(tmp, f"two{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _sharded_unet_matches_unsharded():
    """A frozen diffusers U-Net sharded per block (as the teacher is): its output and the gradient of a loss
    with respect to its input, in float64, next to the unsharded network's. None without diffusers."""
    import copy

    try:
        from utils import tiny_diffusers_unet

        unet = tiny_diffusers_unet().double().requires_grad_(False)
    except BaseException:  # pytest's skip when diffusers is missing
        return None
    from sidfast.training.sharding import fully_shard_network

    ref = copy.deepcopy(unet)
    fully_shard_network(unet)
    g = torch.Generator().manual_seed(0)  # the same input on every rank
    x = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    weight = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([10.0, 500.0], dtype=torch.float64)
    results = []
    for net in (unet, ref):
        xi = x.clone().requires_grad_(True)
        y = net(xi, t).sample
        (y * weight).sum().backward()
        results.append((y.detach(), xi.grad))
    return results


def _one_rank(rank, init_file, tmp):
    """At 1 process: the plain run, the FSDP run; the 2-process checkpoint restored and continued (FSDP and
    plain), and saved again at 1 process."""
    join_gloo_group(rank, 1, init_file)
    try:
        out = {"plain": _run(_cfg(os.path.join(tmp, "one-plain"))),
               "fsdp": _run(_cfg(os.path.join(tmp, "one-fsdp"), fsdp=True)),
               "fsdp-ac": _run(_cfg(os.path.join(tmp, "one-ac"), fsdp=True, activation_checkpointing=True)),
               "fsdp-bf16": _run(_cfg(os.path.join(tmp, "one-bf16"), fsdp=True, fsdp_precision="bf16"))}
        ckpt = os.path.join(tmp, "part", "checkpoint.dcp")
        # the checkpoint file of the plain run, restored into shards
        out["plain-restored"] = _trainer_state(_cfg(os.path.join(tmp, "plain-restored"), fsdp=True,
                                                    resume=os.path.join(tmp, "one-plain", "checkpoint.pt")))
        out["plain-saved"] = _trainer_state(_cfg(os.path.join(tmp, "plain-saved"),
                                                 resume=os.path.join(tmp, "one-plain", "checkpoint.pt")))
        out["state"] = _trainer_state(_cfg(os.path.join(tmp, "one-state"), fsdp=True, resume=ckpt))
        with pytest.warns(UserWarning, match="re-seeded"):
            out["resumed-fsdp"] = _run(_cfg(os.path.join(tmp, "one-resumed"), fsdp=True, resume=ckpt))
        out["resumed-plain"] = _run(_cfg(os.path.join(tmp, "one-resumed-plain"), resume=ckpt))
        back = os.path.join(tmp, "one-resumed", "checkpoint.dcp")
        out["back-saved"] = _trainer_state(_cfg(os.path.join(tmp, "one-back"), fsdp=True, resume=back))
        torch.save(out, os.path.join(tmp, "one.pt"))
    finally:
        dist.destroy_process_group()


def _back_to_two(rank, init_file, tmp):
    join_gloo_group(rank, 2, init_file)
    try:
        back = os.path.join(tmp, "one-resumed", "checkpoint.dcp")
        torch.save(_trainer_state(_cfg(os.path.join(tmp, "two-back"), fsdp=True, resume=back)),
                   os.path.join(tmp, f"back{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn(fn, nprocs, tmp, tag):
    spawn_workers(fn, (str(tmp / f"init-{tag}"), str(tmp)), nprocs)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    _spawn(_two_ranks, 2, tmp, "two")
    _spawn(_one_rank, 1, tmp, "one")
    _spawn(_back_to_two, 2, tmp, "back")
    load = lambda name: torch.load(tmp / name, weights_only=False)  # noqa: E731 (test-written files)
    return tmp, [load("two0.pt"), load("two1.pt")], load("one.pt"), [load("back0.pt"), load("back1.pt")]


def _assert_equal(a: dict, b: dict, what: str):
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), (what, k, (a[k] - b[k]).abs().max())


def _assert_same_run(a: dict, b: dict, what: str):
    for key in ("G", "ema", "fake"):
        _assert_equal(a[key], b[key], f"{what}: {key}")
    assert (a["iteration"], a["nimg"]) == (b["iteration"], b["nimg"]), what


@pytest.mark.parametrize("fake_score", ["full", "lora"])
def test_fsdp_run_equals_ddp_run_at_two_ranks(runs, fake_score):
    _, two, _, _ = runs
    for r in two:
        _assert_same_run(r[f"fsdp-{fake_score}"], r[f"ddp-{fake_score}"], f"fsdp vs ddp, {fake_score} fake")
        assert r[f"fsdp-{fake_score}"]["iteration"] == 4
    # training moved the weights (a comparison of untouched networks would prove nothing)
    init = two[0]["part-state"]
    assert not torch.equal(two[0]["fsdp-full"]["G"]["net.out.weight"], init["G"]["net.out.weight"])


def test_fsdp_run_of_a_network_with_root_parameters_samples_grids_between_updates(runs):
    """FSDP2 leaves a root module's parameters gathered after a forward without backward (a sample grid);
    the EMA update after the grid met full tensors where it expects shards, and every rank died. The run
    with grids, EMA and checkpoints now ends as the DDP run does: bit for bit once the DDP run sums its
    gradients in FSDP's order (FSDP's node on the inputs of a module holding parameters: each network's input
    gradient is summed inside it before the teacher's and the fake score's meet at their shared noised input;
    docs/runs.md, "FSDP against DDP"), and within gradient rounding as it runs (the tolerance from the DDP
    run with its loss scale one ulp up)."""
    tmp, two, _, _ = runs
    for r in two:
        _assert_same_run(r["fsdp-rooted"], r["ddp-rooted-input-nodes"], "fsdp vs ddp with FSDP's input nodes")
        for key in ("G", "ema", "fake"):
            a, b, nudged = r["fsdp-rooted"][key], r["ddp-rooted"][key], r["ddp-rooted-nudged"][key]
            assert a.keys() == b.keys()
            for k in a:
                tol = gradient_rounding_tolerance(b[k], nudged[k], r["ddp-rooted"]["iteration"])
                assert float((a[k] - b[k]).abs().max()) <= tol, (key, k)
        assert r["fsdp-rooted"]["iteration"] == 4
    assert (tmp / "fsdp-rooted" / "student_000002.png").is_file()


def test_fsdp_at_one_process_equals_the_plain_single_process_run(runs):
    _, _, one, _ = runs
    _assert_same_run(one["fsdp"], one["plain"], "fsdp at 1 process vs plain")


def test_activation_checkpointing_and_bf16_parameters_under_fsdp(runs):
    _, _, one, _ = runs
    # recomputation redraws the same dropout masks (the random state is restored): the same run
    _assert_same_run(one["fsdp-ac"], one["plain"], "activation checkpointing vs plain")
    # bf16 all-gathered parameters: fp32 master weights that differ from the fp32 run, by no more than two
    # runs' Adam steps can: with beta1 = 0 a step moves a weight by lr |g_t| / sqrt(v_t) <= lr sqrt(t)
    # (v_t >= (1 - beta2) g_t^2 / (1 - beta2^t)), so by at most lr * sum_t sqrt(t) each
    cfg = _cfg("unused")
    bound = 2 * cfg.lr * sum(math.sqrt(t) for t in range(1, cfg.iterations + 1))
    for key in ("G", "fake"):
        bf16, fp32 = one["fsdp-bf16"][key], one["plain"][key]
        assert all(v.dtype == torch.float32 for v in bf16.values())
        diff = max(float((bf16[k] - fp32[k]).abs().max()) for k in fp32)
        assert 0 < diff <= bound, (key, diff, bound)


def test_sharded_diffusers_unet_equals_the_unsharded_one(runs):
    _, two, _, _ = runs
    if two[0]["unet"] is None:
        pytest.skip("diffusers is not installed")
    for r in two:
        (y, gx), (y_ref, gx_ref) = r["unet"]
        # the same weights and operations; backward kernels may sum in another order for the all-gathered
        # weights. In float64 a sum of n terms reordered moves by <= 2 n u sum|terms| (u = 2^-53): 1e-10 of
        # the largest value allows sums of ~1e5 terms as large as the result, far more than this U-Net has
        # (at most 16 channels * 3 * 3 per output element).
        for a, b in ((y, y_ref), (gx, gx_ref)):
            assert (a - b).abs().max() <= 1e-10 * b.abs().max()
        assert gx.abs().sum() > 0


def test_checkpoint_file_of_an_unsharded_run_restores_into_shards(runs):
    _, _, one, _ = runs
    for key in ("G", "ema", "fake", "opt_g", "opt_fake"):
        _assert_equal(one["plain-restored"][key], one["plain-saved"][key], f"checkpoint.pt -> fsdp: {key}")
    assert one["plain-restored"]["iteration"] == 4


def test_per_rank_bytes_are_half_of_the_full_run(runs):
    _, two, _, _ = runs
    for fake_score in ("full", "lora"):
        full = two[0][f"ddp-{fake_score}-bytes"]
        shards = [r[f"fsdp-{fake_score}-bytes"] for r in two]
        for net in ("G", "fake", "teacher"):
            for kind in full[net]:
                per_rank = [s[net][kind] for s in shards]
                assert sum(per_rank) == full[net][kind], (fake_score, net, kind)
                # dim-0 chunks of ceil(rows / 2): the two halves differ by at most one row per tensor
                bound = full[net][kind] / 2 + _max_row_bytes(two, fake_score, net)
                assert max(per_rank) <= bound, (net, kind)
                assert per_rank[0] > 0 and per_rank[1] > 0


def _max_row_bytes(two, fake_score, net):
    sd = two[0][f"ddp-{fake_score}"]["G" if net == "G" else "fake"]
    if net == "teacher":
        sd = _teacher().state_dict()
    return sum(v[0].numel() * v.element_size() * 2 for v in sd.values() if v.dim() > 0)


def test_sharded_checkpoint_resumes_at_the_same_world_size_as_the_uninterrupted_run(runs):
    _, two, _, _ = runs
    for r in two:
        assert r["part"]["interrupted"] == "callback" and r["part"]["iteration"] == 2
        _assert_same_run(r["part-resumed"], r["fsdp-full"], "2 -> 2 ranks resume vs uninterrupted")


def test_two_rank_checkpoint_restores_exactly_at_one_rank_and_back(runs):
    tmp, two, one, back = runs
    saved = two[0]["part-state"]  # what the 2-rank run restores from its own checkpoint (iteration 2)
    assert (saved["iteration"], saved["nimg"]) == (2, 16)
    for key in ("G", "ema", "fake", "opt_g", "opt_fake"):
        _assert_equal(one["state"][key], saved[key], f"2 -> 1: {key}")
        assert saved[key]
    assert (one["state"]["iteration"], one["state"]["nimg"]) == (2, 16)
    # continued at 1 process: the same as the plain single-process run resumed from the same checkpoint
    _assert_same_run(one["resumed-fsdp"], one["resumed-plain"], "1-rank fsdp vs plain continuation")
    assert one["resumed-fsdp"]["iteration"] == 4
    # saved at 1 process (iteration 4) and restored at 2: the same weights, optimizer states and counters
    for r in back:
        for key in ("G", "ema", "fake", "opt_g", "opt_fake"):
            _assert_equal(r[key], one["back-saved"][key], f"1 -> 2: {key}")
        assert (r["iteration"], r["nimg"]) == (4, 32)
    _assert_equal(one["back-saved"]["G"], one["resumed-fsdp"]["G"], "saved at 1 rank")
    assert not (tmp / "part" / ".checkpoint.dcp.tmp").exists()


# ---- in one process: the blocks, activation checkpointing, options, the command line ----

class _EDMLike(torch.nn.Module):
    """The layout of NVlabs/edm's SongUNet inside EDMPrecond: ``model.enc`` / ``model.dec`` ModuleDicts."""

    def __init__(self):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.map_noise = torch.nn.Linear(1, 4)
        self.model.enc = torch.nn.ModuleDict({"8x8_conv": torch.nn.Conv2d(3, 4, 3),
                                             "8x8_block0": torch.nn.Conv2d(4, 4, 3)})
        self.model.dec = torch.nn.ModuleDict({"8x8_block0": torch.nn.Conv2d(4, 4, 3),
                                             "8x8_aux": torch.nn.Identity()})


def test_the_teacher_of_a_sharded_run_with_a_lora_fake_score_guides_as_the_teacher():
    """Under FSDP with a LoRA fake score the teacher is the fake score with its LoRA layers off (``LoRAOff``):
    guidance asks it for the teacher's unconditional call, which it refused as if the teacher had no
    classes ("--guidance: teacher ... is unconditional" for a class-conditional teacher)."""
    from nets import conditional_teacher

    from sidfast.models.denoiser import as_denoiser
    from sidfast.models.lora import LoRAFakeScore
    from sidfast.training.sharding import LoRAOff

    teacher = as_denoiser(conditional_teacher())
    off = LoRAOff(LoRAFakeScore(as_denoiser(conditional_teacher()), rank=2))
    assert off.num_classes == teacher.num_classes > 0 and off.label_format == teacher.label_format
    null, want = off.null_condition(3), teacher.null_condition(3)
    assert null.keys() == want.keys() and all(torch.equal(null[k], want[k]) for k in want)
    assert torch.equal(off.labels(torch.tensor([0, 2])), teacher.labels(torch.tensor([0, 2])))


def test_shard_blocks_finds_the_natural_blocks():
    from nets import tiny_teacher

    from sidfast.models.denoiser import as_denoiser
    from sidfast.training.sharding import shard_blocks

    def names(net):
        ids = {id(m): n for n, m in net.named_modules()}
        return [ids[id(b)] for b in shard_blocks(net)]

    assert names(_EDMLike()) == ["model.enc.8x8_conv", "model.enc.8x8_block0", "model.dec.8x8_block0"]
    assert names(as_denoiser(tiny_teacher())) == ["net.inp", "net.out"]  # no known container: top children
    diffusers = pytest.importorskip("diffusers")
    from utils import tiny_diffusers_unet

    assert names(tiny_diffusers_unet()) == ["down_blocks.0", "down_blocks.1", "up_blocks.0", "up_blocks.1",
                                            "mid_block"]
    sd3 = diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2,
                                          attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                          caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
                                          pos_embed_max_size=8)
    assert names(sd3) == ["transformer_blocks.0", "transformer_blocks.1"]


def test_activation_checkpointing_recomputes_each_block_with_the_same_gradients():
    import copy

    from nets import tiny_teacher

    from sidfast.models.denoiser import as_denoiser
    from sidfast.training.sharding import checkpoint_blocks

    net = as_denoiser(tiny_teacher(num_classes=0)).train()
    ckpt = copy.deepcopy(net)
    calls = {"plain": 0, "ckpt": 0}
    for tag, model in (("plain", net), ("ckpt", ckpt)):
        layer = model.net.inp

        def counted(x, layer=layer, tag=tag):
            calls[tag] += 1
            return torch.nn.Linear.forward(layer, x)

        layer.forward = counted
    checkpoint_blocks(ckpt)
    assert list(ckpt.state_dict()) == list(net.state_dict())  # the module tree is unchanged
    x = torch.randn(4, 1, 4, 4)
    sigma = torch.rand(4) + 0.5
    grads = []
    for model in (net, ckpt):
        torch.manual_seed(1)  # the same dropout masks, which checkpointing replays in its recomputation
        model(x, sigma).square().sum().backward()
        grads.append([p.grad for p in model.parameters()])
    assert calls == {"plain": 1, "ckpt": 2}
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_fsdp_options_are_checked():
    from sidfast.training.config import TrainConfig

    with pytest.raises(ValueError, match="--engine fused .*--fsdp use --engine eager"):
        TrainConfig(fsdp=True, engine="fused").validate()
    with pytest.raises(ValueError, match="--fsdp-precision bf16 needs --fsdp"):
        TrainConfig(fsdp_precision="bf16").validate()
    with pytest.raises(ValueError, match="fsdp_precision must be one of fp32, bf16"):
        TrainConfig(fsdp=True, fsdp_precision="fp16").validate()


def test_torchrun_launch_with_fsdp(tmp_path):
    """The path a user runs, sample grids included (every rank takes part in a sharded network's forward)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(HERE)  # this checkout, not an installed sidfast
    env.update(PYTHONPATH=os.pathsep.join([root, HERE, env.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    run = tmp_path / "run"
    args = ["-m", "sidfast.cli", "distill", "--teacher", "nets:rooted_teacher", "--run-dir", str(run),
            "--iterations", "3", "--batch", "8", "--log-every", "1", "--grid-size", "4",
            "--teacher-steps", "2", "--no-progress", "--device", "cpu", "--fsdp", "--fake-score", "lora",
            "--lora-rank", "4", "--activation-checkpointing"]
    code, out, err = torchrun(args, env, timeout=180)
    assert code == 0, err[-3000:]
    assert out.count("SiD distillation") == 1
    from sidfast.training.state import read_distill

    data = read_distill(run / "checkpoint.dcp")
    assert (data["world_size"], data["iteration"], data["nimg"]) == (2, 3, 24)
    assert (run / "student.png").is_file() and (run / "teacher.png").is_file()


_END_PROCESS = """
import atexit, sys
from sidfast import runtime
atexit.register(lambda: open(sys.argv[2], "w").write("exit handler ran"))
if sys.argv[1] == "group":
    runtime.shutdown(runtime.init_distributed("cpu", group_always=True))
print("unflushed line", end="")
runtime.end_process(3)
"""


@pytest.mark.parametrize("group", ["group", "none"])
def test_end_process_keeps_the_exit_status_output_and_exit_handlers(tmp_path, group):
    """``end_process`` (the sidfast command's last step) skips interpreter teardown only after a process group
    this process created; either way the status, buffered output and exit handlers are kept."""
    import subprocess

    marker = tmp_path / "marker"
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _END_PROCESS, group, str(marker)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert proc.stdout == "unflushed line"
    assert marker.read_text() == "exit handler ran"


def test_fsdp_in_one_process_keeps_the_previous_checkpoint_and_resumes(tmp_path):
    """Without torchrun --fsdp makes a process group of one (and ends it); each save keeps the one it
    replaces as checkpoint.prev.dcp."""
    from nets import tiny_teacher

    from sidfast.training.state import read_distill
    from sidfast.training.loop import distill

    run = tmp_path / "run"
    first = distill(_cfg(str(run), fsdp=True, iterations=3, checkpoint_every=2), tiny_teacher(num_classes=3),
                    log=None)
    assert first.checkpoint == run / "checkpoint.dcp" and not dist.is_initialized()
    assert read_distill(run / "checkpoint.dcp")["iteration"] == 3
    assert read_distill(run / "checkpoint.prev.dcp")["iteration"] == 2
    resumed = distill(_cfg(str(run), fsdp=True, resume="auto"), tiny_teacher(num_classes=3), log=None)
    assert (resumed.iteration, resumed.nimg) == (4, 32)
    assert read_distill(run / "checkpoint.prev.dcp")["iteration"] == 3


def test_torchrun_fsdp_with_default_options_then_sample_the_run_folder(tmp_path):
    """What a user types: a train-teacher teacher (parameters outside its blocks), --fsdp and the default
    grids, EMA and checkpoints; then ``sidfast sample RUN``, which reads the sharded checkpoint, gives the
    images of the consolidated generator.pt."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE, env.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    teacher, run = tmp_path / "teacher.pt", tmp_path / "run"
    cli = [sys.executable, "-m", "sidfast.cli"]
    proc = subprocess.run([*cli, "train-teacher", "--out", str(teacher), "--iterations", "2", "--device", "cpu"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "sidfast.cli", "distill", "--teacher", str(teacher), "--run-dir", str(run),
                           "--device", "cpu", "--iterations", "3", "--batch", "8", "--fsdp", "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "student_init.png").is_file() and (run / "student.png").is_file()
    images = []
    for source in (run, run / "generator.pt"):
        out = tmp_path / f"{source.name}.png"
        proc = subprocess.run([*cli, "sample", str(source), "--out", str(out), "--num", "4", "--device", "cpu"],
                              env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        images.append(out.read_bytes())
    assert images[0] == images[1]
