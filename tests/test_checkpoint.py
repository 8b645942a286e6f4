"""sidfast.checkpoint: atomic writes that keep the previous file, and clear errors for bad checkpoints."""
import os
import pickle

import pytest
import torch
from torch import nn

from sidfast import checkpoint
from sidfast.checkpoint import CheckpointError, atomic_save, load_checkpoint, previous_path


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
    path = checkpoint.save_network(tmp_path / "t.pt", net, "test_checkpoint:build_linear", {"n_in": 3, "n_out": 2},
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
