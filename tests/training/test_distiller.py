"""sidfast.training.loop.Distiller: the public step a user's own loop drives, and its start at an image count."""
import pytest
import torch

from nets import tiny_teacher
from runs import assert_bitwise, assert_same_run, quiet, sida, states
from sidfast.training.loop import Distiller, distill
from sidfast.training.updates import ema_beta


def test_own_loop_of_steps_trains_what_distill_trains(tmp_path):
    cfg = quiet(run_dir=str(tmp_path / "distill"))
    ran = distill(cfg, tiny_teacher(), log=None)
    d = Distiller(quiet(run_dir=str(tmp_path / "own")), tiny_teacher())
    while d.iteration < 4:
        loss_g, loss_fake = d.step()
        assert loss_g.dim() == 0 and loss_fake.dim() == 0 and torch.isfinite(loss_g)
    assert (d.iteration, d.nimg) == (ran.iteration, ran.nimg) == (4, 32)
    assert_same_run(ran, d)


def test_save_writes_a_checkpoint_that_distill_resumes(tmp_path):
    d = Distiller(quiet(run_dir=str(tmp_path / "run")), tiny_teacher())
    d.step()
    d.step()
    path = d.save()
    assert path.name == "checkpoint.pt"
    resumed = distill(quiet(run_dir=str(tmp_path / "run"), resume="auto"), tiny_teacher(), log=None)
    full = distill(quiet(run_dir=str(tmp_path / "full")), tiny_teacher(), log=None)
    assert resumed.iteration == 4
    assert_same_run(full, resumed)


def test_start_nimg_opens_sidas_generator_gate_and_sets_the_ema_rampup(tmp_path):
    # g_start_kimg 0.1: the generator steps only after 100 images; a run started at 200 images steps at once
    cfg = sida(tmp_path, iterations=1, g_start_kimg=0.1, gan_start_kimg=0.1)
    teacher = tiny_teacher()
    fresh = Distiller(cfg, teacher)
    before = states(fresh.generator)
    fresh.step()
    assert_bitwise(states(fresh.generator), before)  # gate closed at 0 images: generator untouched

    late = Distiller(sida(tmp_path, name="late", iterations=1, g_start_kimg=0.1, gan_start_kimg=0.1),
                     tiny_teacher(), start_nimg=200)
    assert (late.nimg, late.iteration) == (200, 200 // cfg.batch)
    g0, ema0 = states(late.generator), states(late.generator_ema)
    late.step()
    moved = states(late.generator)
    assert any(not torch.equal(moved[k], g0[k]) for k in g0)  # gate open: the generator stepped
    # the EMA followed EDM's formula at 200 images seen
    beta = ema_beta(200, late.cfg.batch, late.cfg.ema_halflife_kimg, late.cfg.ema_rampup_ratio)
    for k, v in states(late.generator_ema).items():
        if v.is_floating_point():
            assert torch.equal(v, moved[k].lerp(ema0[k], beta)), k
    assert late.nimg == 200 + cfg.batch


def test_start_nimg_errors(tmp_path):
    with pytest.raises(ValueError, match="start_nimg must be a non-negative integer"):
        Distiller(quiet(run_dir=str(tmp_path / "a")), tiny_teacher(), start_nimg=-8)
    with pytest.raises(ValueError, match="start_nimg must be a non-negative integer"):
        Distiller(quiet(run_dir=str(tmp_path / "b")), tiny_teacher(), start_nimg=True)
    distill(quiet(run_dir=str(tmp_path / "c"), iterations=1), tiny_teacher(), log=None)
    with pytest.raises(ValueError, match="start_nimg is for a run that starts from given weights"):
        Distiller(quiet(run_dir=str(tmp_path / "c"), resume="auto"), tiny_teacher(), start_nimg=64)


def test_a_run_that_cannot_start_leaves_no_process_group(tmp_path):
    # --fsdp in one process makes a process group of one; an error while building the run must end it
    with pytest.raises(ValueError, match="start_nimg must be a non-negative integer"):
        Distiller(quiet(run_dir=str(tmp_path / "a"), fsdp=True), tiny_teacher(), start_nimg=-1)
    assert not torch.distributed.is_initialized()
