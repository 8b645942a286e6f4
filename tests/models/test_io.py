"""sidfast.models.io: atomic writes that keep the previous file, and clear errors for bad checkpoints."""
import os
import pickle
import struct

import pytest
import torch
from torch import nn

from sidfast.models import io as checkpoint
from sidfast.models.io import CheckpointError, load_checkpoint
from sidfast.utils.files import atomic_save, previous_path, unreadable_path


def _distill_like(value):
    return {"format": checkpoint.FORMATS["distill"], "version": checkpoint.VERSION, "w": torch.full((3,), value)}


def test_atomic_save_replaces_and_keeps_the_previous_file(tmp_path):
    path = tmp_path / "sub" / "checkpoint.pt"
    atomic_save(_distill_like(1.0), path)
    assert not previous_path(path).exists()
    atomic_save(_distill_like(2.0), path)
    assert torch.equal(load_checkpoint(path, "distill")["w"], torch.full((3,), 2.0))
    assert torch.equal(load_checkpoint(previous_path(path), "distill")["w"], torch.full((3,), 1.0))
    assert previous_path(path).name == "checkpoint.prev.pt"
    # no temporary files left behind
    assert sorted(p.name for p in path.parent.iterdir()) == ["checkpoint.prev.pt", "checkpoint.pt"]


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("disk full (simulated)")


def test_a_failed_save_leaves_the_good_checkpoint_untouched(tmp_path):
    path = tmp_path / "checkpoint.pt"
    atomic_save(_distill_like(1.0), path)
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="disk full"):
        atomic_save({"format": "sidfast.distill", "bad": _Unpicklable(), "big": torch.zeros(1000)}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_truncated_checkpoint_is_a_clear_error_naming_the_previous_one(tmp_path):
    path = tmp_path / "checkpoint.pt"
    atomic_save(_distill_like(1.0), path)
    atomic_save(_distill_like(2.0), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"is truncated.*--resume \S*checkpoint\.prev\.pt"):
        load_checkpoint(path, "distill")
    assert previous_path(path).read_bytes() != path.read_bytes()
    assert load_checkpoint(previous_path(path), "distill")["w"][0] == 1.0


@pytest.mark.parametrize("content, match", [
    ({"state_dict": {"w": torch.zeros(2)}}, "without a sidfast format marker"),
    ({"format": "sidfast.network", "version": 1}, "expected a 'sidfast.distill'"),
    ([1, 2, 3], "list without a sidfast format marker"),
    ({"format": "sidfast.distill", "version": 99}, "version 99"),
])
def test_foreign_checkpoints_are_refused(tmp_path, content, match):
    path = tmp_path / "x.pt"
    torch.save(content, path)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path, "distill")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickles_that_run_code_are_not_executed(tmp_path):
    path = tmp_path / "evil.pt"
    marker = tmp_path / "ran"
    with open(path, "wb") as f:
        pickle.dump(_Touch(str(marker)), f)
    with pytest.raises(CheckpointError, match="is not a torch checkpoint"):
        load_checkpoint(path, "distill")
    assert not marker.exists()


class _Touch:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_missing_unreadable_and_directory_paths(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt", "distill")
    with pytest.raises(CheckpointError, match="not a file"):
        load_checkpoint(tmp_path, "distill")
    if os.geteuid() != 0:  # root reads everything
        p = tmp_path / "locked.pt"
        torch.save(_distill_like(0.0), p)
        p.chmod(0)
        with pytest.raises(CheckpointError, match="not readable"):
            load_checkpoint(p, "distill")
    with pytest.raises(ValueError, match="kind must be"):
        load_checkpoint(tmp_path / "x.pt", "model")


def test_either_kind_and_kind_of(tmp_path):
    path = tmp_path / "n.pt"
    checkpoint.save_network(path, nn.Linear(2, 3), "torch.nn:Linear", {"in_features": 2, "out_features": 3})
    data = load_checkpoint(path, ("distill", "network"))
    assert checkpoint.kind_of(data) == "network"


def build_linear(config):
    return nn.Linear(config["n_in"], config["n_out"])


def test_network_checkpoint_round_trip_and_mismatch(tmp_path):
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    path = checkpoint.save_network(tmp_path / "t.pt", net, "test_io:build_linear", {"n_in": 3, "n_out": 2},
                                   meta={"note": "x"})
    loaded, meta = checkpoint.load_network(path)
    assert meta == {"note": "x"} and not loaded.training
    for k, v in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    data = load_checkpoint(path, "network")
    data["config"] = {"n_in": 4, "n_out": 2}
    with pytest.raises(CheckpointError, match="weights do not fit"):
        checkpoint.build_network(data, path)
    data["builder"] = "no_such_module_xyz:f"
    with pytest.raises(CheckpointError, match="cannot rebuild"):
        checkpoint.build_network(data, path)


def test_an_unreadable_checkpoint_is_set_aside_not_rotated_over_the_previous_one(tmp_path):
    """A corrupt checkpoint.pt (resumed from checkpoint.prev.pt) must not replace the good .prev on the next save;
    it is kept under a name that says so."""
    path = tmp_path / "checkpoint.pt"
    atomic_save(_distill_like(1.0), path)
    atomic_save(_distill_like(2.0), path)
    good_prev = previous_path(path).read_bytes()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    torn = path.read_bytes()
    atomic_save(_distill_like(3.0), path)
    assert previous_path(path).read_bytes() == good_prev
    assert load_checkpoint(path, "distill")["w"][0] == 3.0
    assert unreadable_path(path).name == "checkpoint.unreadable.pt"
    assert unreadable_path(path).read_bytes() == torn
    # a flipped byte inside a stored tensor fails the zip CRC: set aside too, next to the first one
    data = path.read_bytes()
    at = data.index(struct.pack("<3f", 3.0, 3.0, 3.0))
    path.write_bytes(data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:])
    flipped = path.read_bytes()
    atomic_save(_distill_like(4.0), path)
    assert previous_path(path).read_bytes() == good_prev
    assert unreadable_path(path).read_bytes() == torn
    assert (tmp_path / "checkpoint.unreadable.1.pt").read_bytes() == flipped
    # a readable one rotates as before
    atomic_save(_distill_like(5.0), path)
    assert load_checkpoint(previous_path(path), "distill")["w"][0] == 4.0


@pytest.mark.parametrize("content, says", [
    (b"", "is empty (0 bytes)"),
    (bytes(range(256)) * 4, "is not a torch checkpoint"),
    (None, "is truncated"),
])
def test_bad_files_say_what_they_are_and_what_to_do(tmp_path, content, says):
    path = tmp_path / "checkpoint.pt"
    atomic_save(_distill_like(1.0), path)
    atomic_save(_distill_like(2.0), path)
    if content is None:
        content = path.read_bytes()[:-200]
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, "distill")
    message = str(err.value)
    assert says in message
    assert f"--resume {previous_path(path)}" in message and "--overwrite" in message
    assert "EOFError" not in message and "Weights only" not in message and "weights_only=False" not in message
    previous_path(path).unlink()
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, "distill")
    assert says in str(err.value) and "--overwrite" in str(err.value) and "--resume" not in str(err.value)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_follow_the_umask(tmp_path, umask):
    from sidfast.utils.images import save_grid

    old = os.umask(umask)
    try:
        atomic_save({"x": torch.zeros(1)}, tmp_path / "checkpoint.pt")
        save_grid(torch.zeros(4, 1, 4, 4), tmp_path / "grid.png")
        (tmp_path / "plain.json").write_text("{}")  # what open() gives: the reference
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    for name in ("checkpoint.pt", "grid.png", "plain.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == expected, name
