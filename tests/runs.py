"""Helpers for short ``distill`` runs shared by the training tests: a quiet CPU config, state snapshots and
bitwise comparisons of runs, an interrupted-and-resumed run, a SiDA config with a small real data set."""
import numpy as np
import torch

from nets import SHAPE
from sidfast.training.loop import TrainConfig, distill


def quiet(**kw):
    base = dict(iterations=4, batch=8, device="cpu", checkpoint_every=0, log_every=1, sample_every=0, grid_size=0,
                teacher_steps=0, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def resolved(cfg, teacher=None):
    """``cfg`` with its recipe's values filled in, as the trainer completes it for ``teacher`` (default: a tiny EDM
    teacher, the edm recipe)."""
    from sidfast.models.denoiser import as_denoiser
    from sidfast.training.recipe import resolve
    from nets import tiny_teacher

    return resolve(cfg, as_denoiser(teacher if teacher is not None else tiny_teacher())).cfg


def states(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def assert_bitwise(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def assert_same_run(a, b):
    """The generator, its EMA and the fake score of two distill results are equal bit for bit."""
    for name in ("generator", "generator_ema", "fake"):
        assert_bitwise(states(getattr(a, name)), states(getattr(b, name)))


def stopped_and_resumed(tmp_path, teacher, **kw):
    """(uninterrupted run, resumed run) of ``distill`` with options ``kw``: one run to the end in
    tmp_path/full, one stopped by a callback after iteration 2 in tmp_path/part and resumed there;
    ``teacher()`` builds a fresh teacher for each run."""
    full = distill(quiet(run_dir=str(tmp_path / "full"), **kw), teacher(), log=None)
    part = distill(quiet(run_dir=str(tmp_path / "part"), **kw), teacher(),
                   callbacks=[lambda s: s["iteration"] == 2], log=None)
    assert part.iteration == 2
    resumed = distill(quiet(run_dir=str(tmp_path / "part"), resume="auto", **kw), teacher(), log=None)
    return full, resumed


LAYER = "inp"  # TinyEDM's first layer: its output's feature mean is the discriminator's logit


def real_images(path, count=20, num_classes=0, seed=0):
    """An .npz of ``count`` uint8 (N, H, W, C) images of SHAPE (labels when ``num_classes``)."""
    rng = np.random.RandomState(seed)
    arrays = {"images": rng.randint(0, 256, (count, SHAPE[1], SHAPE[2], SHAPE[0])).astype(np.uint8)}
    if num_classes:
        arrays["labels"] = rng.randint(0, num_classes, count)
    np.savez(path, **arrays)
    return str(path)


def sida(tmp_path, name="run", num_classes=0, **kw):
    base = dict(method="sida", data=real_images(tmp_path / "real.npz", num_classes=num_classes),
                disc_layer=LAYER, run_dir=str(tmp_path / name))
    base.update(kw)
    return quiet(**base)
