"""The in-loop metric (``--eval``, sidfast/training/evaluation.py): when it runs, what it writes, best.pt across
resume, and that a run's weights are the same with it on, off, or consuming random numbers."""
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from nets import tiny_teacher
from runs import assert_bitwise, assert_same_run, quiet, states
from sidfast.evaluate.loop_metrics import metric_for
from sidfast.evaluate.teacher_fd import NUM, REFERENCE_NAME, TeacherFD
from sidfast.models.denoiser import as_denoiser
from sidfast.models.io import CheckpointError
from sidfast.training.evaluation import BEST_NAME, EvalRun, Metric, eval_key, read_best_eval
from sidfast.training.loop import Distiller, distill
from sidfast.training.report import read_metrics
from sidfast.utils import runtime
from utils import join_gloo_group, run_main, spawn_workers

EVERY = 0.016  # kimg: every 2 iterations of batch 8


class Scripted(Metric):
    """A test metric: the value of the images seen, from a table (``values[nimg]``); records its calls.
    ``draw`` consumes every random stream the trainer uses, as a careless metric would."""

    name = "teacher-fd"  # what --eval names; the loop only asks name, lower_is_better, setup, compute

    def __init__(self, values, draw=False, lower_is_better=True):
        self.values, self.draw, self.lower_is_better = values, draw, lower_is_better
        self.calls, self.setups = [], 0

    def setup(self, run):
        self.setups += 1
        self._consume()

    def compute(self, run):
        self._consume()
        nimg = self.nimg_of(run)
        self.calls.append(nimg)
        return self.values[nimg]

    def nimg_of(self, run):
        return self.current

    def _consume(self):
        if self.draw:
            torch.randn(5)
            np.random.rand(3)
            random.random()


def _run(tmp_path, name, metric=None, callbacks=(), **kw):
    options = dict(run_dir=str(tmp_path / name), iterations=6, eval_every=EVERY)
    options.update(kw)
    if metric is not None:
        options.setdefault("eval", "teacher-fd")
    else:
        options.pop("eval_every")
    cfg = quiet(**options)
    return distill(cfg, tiny_teacher(), callbacks=callbacks, metric=metric, log=None)


def _tracking(metric):
    """A callback that tells ``metric`` the images seen (the loop evaluates after the callbacks)."""
    def track(state):
        metric.current = state["nimg"]
    metric.current = 0
    return track


def test_a_run_with_eval_off_trains_what_its_own_loop_of_steps_trains(tmp_path):
    # eval off: no evaluation code runs; the weights are those of Distiller.step() driven by hand
    result = _run(tmp_path, "distill")
    own = Distiller(quiet(run_dir=str(tmp_path / "own"), iterations=6), tiny_teacher())
    while own.iteration < 6:
        own.step()
    for name in ("generator", "generator_ema", "fake"):
        assert_bitwise(states(getattr(result, name)), states(getattr(own, name)))
    assert not (tmp_path / "distill" / BEST_NAME).exists()
    assert all("teacher_fd" not in r for r in read_metrics(tmp_path / "distill" / "metrics.jsonl"))


@pytest.mark.parametrize("metric", ["drawing", "teacher-fd"])
def test_weights_with_eval_on_equal_weights_with_it_off(tmp_path, metric):
    # TinyEDM has dropout: a generator in train mode draws from the global stream at every forward
    off = _run(tmp_path, "off")
    if metric == "drawing":
        m = Scripted({n: float(10 - n / 8) for n in range(0, 49, 8)}, draw=True)
        on = _run(tmp_path, "on", m, callbacks=[_tracking(m)])
        assert m.calls == [0, 16, 32, 48] and m.setups == 1
    else:
        cfg = quiet(run_dir=str(tmp_path / "on"), iterations=6, eval="teacher-fd", eval_every=EVERY, eval_num=40,
                    teacher_steps=3)
        on = distill(cfg, tiny_teacher(), metric=metric_for(cfg), log=None)
    assert_same_run(off, on)


def test_evaluations_are_logged_plotted_and_summarized(tmp_path):
    m = Scripted({0: 5.0, 16: 3.0, 32: 4.0, 48: 3.5})
    result = _run(tmp_path, "run", m, callbacks=[_tracking(m)], sample_every=2)
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "teacher_fd" in r]
    assert [(r["iteration"], r["nimg"], r["teacher_fd"], r["best"]) for r in records] == [
        (0, 0, 5.0, True), (2, 16, 3.0, True), (4, 32, 4.0, False), (6, 48, 3.5, False)]
    assert all(r["eval_seconds"] >= 0 for r in records)
    assert result.summary["best_teacher_fd"] == 3.0 and result.summary["best_nimg"] == 16
    assert result.evaluation["best_checkpoint"] == str(tmp_path / "run" / BEST_NAME)
    assert (tmp_path / "run" / "losses.png").is_file()
    held = read_best_eval(tmp_path / "run" / BEST_NAME)
    assert held["value"] == 3.0 and held["nimg"] == 16 and held["iteration"] == 2


def test_a_higher_is_better_metric_keeps_the_highest(tmp_path):
    m = Scripted({0: 5.0, 16: 3.0, 32: 7.0, 48: 6.0}, lower_is_better=False)
    result = _run(tmp_path, "run", m, callbacks=[_tracking(m)])
    assert result.summary["best_teacher_fd"] == 7.0 and result.summary["best_nimg"] == 32


def test_eval_every_zero_measures_at_the_start_and_the_end(tmp_path):
    m = Scripted({0: 5.0, 48: 4.0})
    _run(tmp_path, "run", m, callbacks=[_tracking(m)], eval_every=0)
    assert m.calls == [0, 48]


def test_best_pt_holds_the_ema_generator_of_the_best_evaluation(tmp_path):
    m = Scripted({0: 5.0, 16: 4.0, 32: 2.0, 48: 3.0})
    ema = {}

    def keep(state):
        ema[state["nimg"]] = states(state["generator_ema"])

    _run(tmp_path, "run", m, callbacks=[_tracking(m), keep])
    data = torch.load(tmp_path / "run" / BEST_NAME, weights_only=True)
    assert data["consolidated"] and data["nimg"] == 32 and data["eval"]["value"] == 2.0
    assert_bitwise(data["generator_ema"], ema[32])


def test_the_best_survives_resume_and_a_worse_value_does_not_replace_best_pt(tmp_path):
    values = {0: 5.0, 16: 2.0, 32: 4.0, 48: 3.0, 64: 2.5, 80: 6.0}
    m = Scripted(values)
    part = _run(tmp_path, "run", m, callbacks=[_tracking(m), lambda s: s["iteration"] == 4], iterations=10)
    assert part.interrupted == "callback" and part.iteration == 4
    before = (tmp_path / "run" / BEST_NAME).read_bytes()
    m2 = Scripted(values)
    track = _tracking(m2)
    m2.current = 32  # where the run stopped
    resumed = _run(tmp_path, "run", m2, callbacks=[track], iterations=10, resume="auto")
    assert m.calls == [0, 16]  # the stop at iteration 4 skips the evaluation due there
    assert m2.calls == [32, 48, 64, 80]  # ... which the resumed run makes first
    assert resumed.summary["best_teacher_fd"] == 2.0 and resumed.summary["best_nimg"] == 16
    assert (tmp_path / "run" / BEST_NAME).read_bytes() == before
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["eval"]
    assert state["best"] == {"value": 2.0, "nimg": 16, "iteration": 2}


def test_a_best_pt_newer_than_the_checkpoint_is_not_forgotten(tmp_path):
    # checkpoints at iterations 3 and 5 (the stop), evaluations at 0, 2, 4: resumed from the iteration-3
    # checkpoint (as if the run had died after writing best.pt at iteration 4), the run re-measures iteration
    # 4 and keeps best.pt's value
    values = {0: 5.0, 16: 4.0, 32: 1.0, 48: 3.0, 64: 2.0}
    m = Scripted(values)
    _run(tmp_path, "run", m, callbacks=[_tracking(m), lambda s: s["iteration"] == 5], iterations=8,
         checkpoint_every=3)
    run = tmp_path / "run"
    shutil.copy(run / "checkpoint.prev.pt", run / "checkpoint.pt")
    held = torch.load(run / "checkpoint.pt", weights_only=True)
    assert held["iteration"] == 3 and held["eval"]["best"]["value"] == 4.0
    before = (run / BEST_NAME).read_bytes()
    m2 = Scripted({**values, 32: 1.5})  # a worse value than best.pt's this time (the run is not replayed)
    resumed = _run(tmp_path, "run", m2, callbacks=[_tracking(m2)], iterations=8, resume="auto",
                   checkpoint_every=3)
    assert m2.calls == [32, 48, 64]
    assert resumed.summary["best_teacher_fd"] == 1.0 and resumed.summary["best_nimg"] == 32
    assert (run / BEST_NAME).read_bytes() == before


def test_an_evaluation_a_stop_skipped_runs_when_the_run_resumes(tmp_path):
    # stopped at iteration 4 (the evaluation due there is skipped, so that the stop is quick), resumed: the
    # run measures at its start, at the images it stopped at
    m = Scripted({0: 5.0, 16: 4.0, 32: 3.0, 48: 2.0})
    _run(tmp_path, "run", m, callbacks=[_tracking(m), lambda s: s["iteration"] == 4])
    assert m.calls == [0, 16]
    m2 = Scripted({32: 3.0, 48: 2.0})
    track = _tracking(m2)
    m2.current = 32
    _run(tmp_path, "run", m2, callbacks=[track], resume="auto")
    assert m2.calls == [32, 48]


def test_turning_eval_on_at_resume_measures_at_the_start(tmp_path):
    _run(tmp_path, "run", None, callbacks=[lambda s: s["iteration"] == 2])
    m = Scripted({16: 3.0, 32: 2.0, 48: 4.0})
    track = _tracking(m)
    m.current = 16  # where the checkpoint stopped
    _run(tmp_path, "run", m, callbacks=[track], resume="auto")
    assert m.calls == [16, 32, 48]


def test_sample_reads_best_pt_and_resume_refuses_it(tmp_path, capsys):
    m = Scripted({0: 5.0, 16: 4.0, 32: 3.0, 48: 2.0})
    _run(tmp_path, "run", m, callbacks=[_tracking(m)])
    best = tmp_path / "run" / BEST_NAME
    code, _, err = run_main(["sample", str(best), "--out", str(tmp_path / "grid.png"), "--num", "4", "--teacher",
                             "nets:tiny_teacher"], capsys)
    assert code == 0, err
    cfg = quiet(run_dir=str(tmp_path / "again"), resume=str(best))
    with pytest.raises(CheckpointError, match="--eval"):
        distill(cfg, tiny_teacher(), log=None)


def test_the_default_count_spelled_out_on_resume_keeps_the_best_comparable():
    default = quiet(eval="teacher-fd")
    spelled = quiet(eval="teacher-fd", eval_num=NUM)
    assert eval_key(default, metric_for(default)) == eval_key(spelled, metric_for(spelled))
    assert eval_key(default, TeacherFD()) != eval_key(quiet(eval="teacher-fd", eval_num=512), TeacherFD(num=512))


def test_metric_and_option_must_agree(tmp_path):
    with pytest.raises(ValueError, match="option eval teacher-fd: give the trainer its metric"):
        distill(quiet(run_dir=str(tmp_path / "a"), eval="teacher-fd"), tiny_teacher(), log=None)
    with pytest.raises(ValueError, match="option eval is off"):
        distill(quiet(run_dir=str(tmp_path / "b")), tiny_teacher(), metric=Scripted({}), log=None)


def test_turning_eval_off_at_resume_drops_its_options(tmp_path, capsys):
    run = tmp_path / "run"
    common = ["--teacher", "nets:tiny_teacher", "--batch", "4", "--grid-size", "0", "--no-progress", "--device", "cpu"]
    code, _, err = run_main(["distill", *common, "--iterations", "2", "--run-dir", str(run), "--eval", "teacher-fd",
                             "--eval-every", "0.004", "--eval-num", "40", "--teacher-steps", "3"], capsys)
    assert code == 0, err
    code, _, err = run_main(["distill", "--resume", str(run), "--iterations", "4", "--eval", "none",
                             "--no-progress"], capsys)
    assert code == 0, err
    assert [r["iteration"] for r in read_metrics(run / "metrics.jsonl") if "teacher_fd" in r] == [0, 1, 2]


# ---- two processes (gloo) ----

WORLD = 2


def _ddp_worker(rank, init_file, root, fsdp):
    join_gloo_group(rank, WORLD, init_file)
    try:
        root = Path(root)
        base = dict(iterations=4, batch=8, teacher_steps=3, fsdp=fsdp)
        off = distill(quiet(run_dir=str(root / "off"), **base), tiny_teacher(), log=None)
        cfg = quiet(run_dir=str(root / "on"), eval="teacher-fd", eval_every=EVERY, eval_num=40, **base)
        metric = metric_for(cfg)
        on = distill(cfg, tiny_teacher(), metric=metric, log=None)
        dist_state = runtime.Dist(rank=rank, world=WORLD, control=dist.group.WORLD)
        run = EvalRun(cfg, metric.features.teacher, on.generator_ema, (1, 4, 4), 0, "onehot", torch.device("cpu"),
                      dist_state, root / "on", 4)
        value = metric.compute(run)  # every rank calls it: FSDP's sharded generator forwards together
        nets = {} if fsdp else {"off": states(off.generator), "on": states(on.generator),
                                "ema": states(on.generator_ema)}
        torch.save({**nets, "value": value, "summary": on.summary}, root / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_over_two_ranks_every_rank_measures_its_share_and_rank_0_keeps_best_pt(tmp_path, fsdp):
    spawn_workers(_ddp_worker, (str(tmp_path / "init"), str(tmp_path), fsdp), WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    if fsdp:  # the EMA generator gathered from the shards at the run's end
        ema = torch.load(tmp_path / "on" / "generator.pt", weights_only=True)["generator_ema"]
        assert_bitwise(torch.load(tmp_path / "off" / "generator.pt", weights_only=True)["generator_ema"], ema)
    else:
        for r in ranks:  # the evaluation left every rank's training as it was
            assert_bitwise(r["off"], r["on"])
        ema = ranks[0]["ema"]
    assert ranks[0]["value"] == ranks[1]["value"]  # every rank gathers every chunk
    assert ranks[0]["summary"]["best_teacher_fd"] == ranks[1]["summary"]["best_teacher_fd"]
    assert (tmp_path / "on" / BEST_NAME).is_file() and (tmp_path / "on" / REFERENCE_NAME).is_file()
    evals = [r for r in read_metrics(tmp_path / "on" / "metrics.jsonl") if "teacher_fd" in r]
    assert [r["iteration"] for r in evals] == [0, 2, 4]  # one record per evaluation: rank 0 writes
    # one process, the same EMA weights, reference and chunks: the same value as the two ranks'
    cfg = quiet(run_dir=str(tmp_path / "one"), eval="teacher-fd", eval_num=40, teacher_steps=3,
                eval_ref=str(tmp_path / "on" / REFERENCE_NAME))
    metric = metric_for(cfg)
    generator = as_denoiser(tiny_teacher()).eval()
    generator.load_state_dict(ema)
    teacher = as_denoiser(tiny_teacher()).eval().requires_grad_(False)
    run = EvalRun(cfg, teacher, generator, (1, 4, 4), 0, "onehot", torch.device("cpu"), runtime.Dist(),
                  tmp_path / "one", 4)
    with torch.no_grad():
        metric.setup(run)
        assert metric.compute(run) == ranks[0]["value"]
