"""The LoRA generator (option ``generator`` lora): low-rank factors over the teacher's frozen, shared weights
trained in place of a full copy; its EMA, checkpoints, resume, ``sidfast sample`` and the combinations it
refuses."""
import pytest
import torch

from sidfast.models.io import CheckpointError, load_checkpoint
from sidfast.models.lora import LoRAGenerator, lora_parameters, merge_lora
from sidfast.training.student import from_checkpoint
from sidfast.samplers import sample_images
from sidfast.training.loop import TrainConfig, distill
from nets import tiny_teacher
from runs import assert_bitwise, assert_same_run, quiet, sida, states, stopped_and_resumed
from utils import run_main, user_error

RANK = 2
LORA = dict(generator="lora", lora_rank=RANK, lr=1e-3)


def is_factor(name: str) -> bool:
    return name.endswith((".lora_A", ".lora_B"))


def test_only_the_factors_train_over_the_frozen_teacher(tmp_path):
    teacher = tiny_teacher(3)
    before = states(teacher)
    res = distill(quiet(run_dir=str(tmp_path / "r"), iterations=3, **LORA), teacher, log=None)
    assert_bitwise(before, states(teacher))  # the shared weights are never trained
    assert isinstance(res.generator, LoRAGenerator)
    trainable = {n for n, p in res.generator.named_parameters() if p.requires_grad}
    assert trainable and all(is_factor(n) for n in trainable)
    assert any(p.abs().sum() > 0 for n, p in res.generator.named_parameters() if n.endswith(".lora_B"))
    # the generator's base is the teacher's storage, not a copy
    base = [p for n, p in res.generator.network.named_parameters() if not is_factor(n)]
    assert [p.data_ptr() for p in base] == [p.data_ptr() for p in teacher.parameters()]


def test_the_ema_shares_the_base_and_averages_its_own_factors(tmp_path):
    res = distill(quiet(run_dir=str(tmp_path / "r"), iterations=3, ema_halflife_kimg=0.01, **LORA),
                  tiny_teacher(), log=None)
    pairs = list(zip(res.generator_ema.named_parameters(), res.generator.named_parameters()))
    assert all((e is p) != is_factor(name) for (name, e), (_, p) in pairs)  # shared base, own factors
    factors = [(e, p) for (name, e), (_, p) in pairs if is_factor(name)]
    assert factors and not any(e.requires_grad for e, _ in factors)
    assert any(not torch.equal(e, p) for e, p in factors)  # an average, not the generator's factors


def test_ema_update_follows_the_formula_on_factors_only():
    from sidfast.models.denoiser import as_denoiser
    from sidfast.training.networks import ema_copy
    from sidfast.training.updates import update_ema

    g = LoRAGenerator(as_denoiser(tiny_teacher()), rank=RANK)
    ema = ema_copy(g)
    with torch.no_grad():
        for p in lora_parameters(g):
            p.add_(1.0)
    pairs = [(p.detach().double(), e.detach().double())
             for p, e in zip(lora_parameters(g), lora_parameters(ema))]
    teacher_before = states(g.network)
    update_ema(ema, g, 0.25)
    for e, (p, e0) in zip(lora_parameters(ema), pairs):
        # ema <- p + 0.25 (e0 - p), in float64; fp32 lerp rounds its product and sum: 2 ulps of the inputs
        bound = 2 * torch.finfo(torch.float32).eps * (p.abs() + e0.abs()).max().item()
        torch.testing.assert_close(e.double(), p + 0.25 * (e0 - p), rtol=0, atol=bound)
    assert_bitwise(teacher_before, states(g.network))  # the shared base is left alone


def test_checkpoint_holds_the_factors_only(tmp_path):
    res = distill(quiet(run_dir=str(tmp_path / "r"), iterations=2, **LORA), tiny_teacher(), log=None)
    data = torch.load(res.checkpoint, weights_only=True)
    for key in ("generator", "generator_ema"):
        assert data[key] and all(is_factor(k) for k in data[key]), key
    assert set(data["generator"]) == {n for n, _ in res.generator.named_parameters() if is_factor(n)}
    assert len(data["opt_g"]["state"]) == len(lora_parameters(res.generator))
    assert data["config"]["generator"] == "lora" and data["config"]["lora_rank"] == RANK


@pytest.mark.parametrize("fake_score", ["full", "lora"])
def test_resume_is_bitwise(tmp_path, fake_score):
    kw = dict(iterations=5, checkpoint_every=2, fake_score=fake_score, **LORA)
    assert_same_run(*stopped_and_resumed(tmp_path, tiny_teacher, **kw))


def test_fresh_start_depends_on_the_seed_only(tmp_path):
    kw = dict(iterations=0, **LORA)
    torch.manual_seed(1)
    a = distill(quiet(run_dir=str(tmp_path / "a"), **kw), tiny_teacher(), log=None)
    torch.manual_seed(2)
    b = distill(quiet(run_dir=str(tmp_path / "b"), **kw), tiny_teacher(), log=None)
    c = distill(quiet(run_dir=str(tmp_path / "c"), seed=5, **kw), tiny_teacher(), log=None)
    assert_bitwise(states(a.generator), states(b.generator))
    assert not torch.equal(lora_parameters(a.generator)[0], lora_parameters(c.generator)[0])


def test_sample_from_the_checkpoint_is_the_merged_ema_generator(tmp_path):
    res = distill(quiet(run_dir=str(tmp_path / "r"), iterations=3, teacher="nets:tiny_teacher", **LORA),
                  tiny_teacher(), log=None)
    net, options = from_checkpoint(res.checkpoint)
    assert not any(is_factor(n) for n, _ in net.named_parameters())  # a plain network
    got = sample_images(net, 5, seed=3, device="cpu", **options)
    want = sample_images(merge_lora(res.generator_ema.network), 5, seed=3, device="cpu", **options)
    assert torch.equal(got, want)


def test_command_line(tmp_path, capsys):
    run = tmp_path / "run"
    small = ["--iterations", "2", "--batch", "4", "--grid-size", "0", "--teacher-steps", "0", "--no-progress",
             "--device", "cpu"]
    code, _, err = run_main(["distill", "--teacher", "nets:tiny_teacher", "--run-dir", run,
                             "--generator", "lora", "--lora-rank", str(RANK), *small], capsys)
    assert code == 0, err
    data = load_checkpoint(run / "checkpoint.pt", "distill")
    assert data["config"]["generator"] == "lora" and all(is_factor(k) for k in data["generator_ema"])
    code, _, err = run_main(["sample", run / "checkpoint.pt", "--out", tmp_path / "s", "--num", "2"], capsys)
    assert code == 0, err
    user_error(["distill", "--teacher", "nets:tiny_teacher", "--run-dir", tmp_path / "x",
                "--generator", "half", *small], capsys, "half")


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="--generator lora shares the teacher's weights.*--fsdp"):
        TrainConfig(generator="lora", fsdp=True).validate()
    with pytest.raises(ValueError, match="option generator must be one of full, lora"):
        TrainConfig(generator="half").validate()
    with pytest.raises(ValueError, match="--generator lora builds the generator from the teacher's weights"):
        distill(quiet(run_dir=str(tmp_path / "g"), **LORA), tiny_teacher(), generator=tiny_teacher(),
                log=None)
    # a full generator's checkpoint is no LoRA generator's start, and the other way round
    plain = distill(quiet(run_dir=str(tmp_path / "plain"), iterations=1), tiny_teacher(), log=None)
    with pytest.raises(CheckpointError, match="LoRA generator"), \
            pytest.warns(UserWarning, match="--generator"):
        distill(quiet(run_dir=str(tmp_path / "plain"), resume="auto", **LORA), tiny_teacher(), log=None)
    lora = distill(quiet(run_dir=str(tmp_path / "lora"), iterations=1, **LORA), tiny_teacher(), log=None)
    with pytest.raises(CheckpointError, match="holds a full generator .*--generator full.*--generator lora"):
        distill(sida(tmp_path, "a", method="sid2a", init_generator=str(plain.checkpoint), iterations=0,
                     **LORA), tiny_teacher(), log=None)
    with pytest.raises(CheckpointError, match="holds a lora generator"):
        distill(sida(tmp_path, "b", method="sid2a", init_generator=str(lora.checkpoint), iterations=0),
                tiny_teacher(), log=None)


def test_sid2a_starts_from_a_lora_generator_run(tmp_path):
    sid = distill(quiet(run_dir=str(tmp_path / "sid"), iterations=2, **LORA), tiny_teacher(), log=None)
    init = load_checkpoint(sid.checkpoint, "distill")
    res = distill(sida(tmp_path, "sid2a", method="sid2a", init_generator=str(sid.checkpoint), iterations=0,
                       **LORA), tiny_teacher(), log=None)
    for net in (res.generator, res.generator_ema):
        got = {k: v for k, v in states(net).items() if is_factor(k)}
        assert_bitwise(got, init["generator_ema"])
