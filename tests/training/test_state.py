"""sidfast.training.state: how a run checkpoint names its teacher, which checkpoint ``--resume auto`` continues,
and when a fresh start is refused. (Saving, loading and resuming runs bit for bit: test_train.py, test_fsdp.py.)"""
from pathlib import Path

import pytest

from sidfast.training.config import CHECKPOINT_NAME, SHARDED_CHECKPOINT_NAME, TrainConfig
from sidfast.training.state import distill_checkpoint_in, resume_source, teacher_reference


def test_teacher_reference_makes_existing_paths_absolute_and_keeps_entry_points(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.pt").write_bytes(b"")
    assert teacher_reference("t.pt") == str((tmp_path / "t.pt").resolve())
    assert teacher_reference("nets:tiny_teacher") == "nets:tiny_teacher"
    assert teacher_reference(None) is None


def test_resume_auto_takes_the_kind_this_run_writes_else_the_other(tmp_path):
    assert distill_checkpoint_in(tmp_path, sharded=False) == tmp_path / CHECKPOINT_NAME
    assert distill_checkpoint_in(tmp_path, sharded=True) == tmp_path / SHARDED_CHECKPOINT_NAME
    (tmp_path / SHARDED_CHECKPOINT_NAME).mkdir()
    assert distill_checkpoint_in(tmp_path, sharded=False) == tmp_path / SHARDED_CHECKPOINT_NAME
    (tmp_path / CHECKPOINT_NAME).write_bytes(b"")
    assert distill_checkpoint_in(tmp_path, sharded=False) == tmp_path / CHECKPOINT_NAME
    assert distill_checkpoint_in(tmp_path, sharded=True) == tmp_path / SHARDED_CHECKPOINT_NAME


def test_resume_source_fresh_start_resume_and_refusal(tmp_path):
    assert resume_source(TrainConfig(), tmp_path) is None
    (tmp_path / CHECKPOINT_NAME).write_bytes(b"")
    with pytest.raises(ValueError, match=f"already holds {CHECKPOINT_NAME}; pass --resume .* --overwrite"):
        resume_source(TrainConfig(), tmp_path)
    assert resume_source(TrainConfig(overwrite=True), tmp_path) is None
    assert resume_source(TrainConfig(resume="auto"), tmp_path) == tmp_path / CHECKPOINT_NAME
    assert resume_source(TrainConfig(resume="elsewhere.pt"), tmp_path) == Path("elsewhere.pt")


def test_resume_from_a_run_folder_takes_the_checkpoint_in_it(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / CHECKPOINT_NAME).write_bytes(b"")
    assert resume_source(TrainConfig(resume=str(run)), tmp_path / "other") == run / CHECKPOINT_NAME
    sharded = tmp_path / "sharded"
    (sharded / SHARDED_CHECKPOINT_NAME).mkdir(parents=True)
    assert resume_source(TrainConfig(resume=str(sharded), fsdp=True), sharded) == sharded / SHARDED_CHECKPOINT_NAME
    (sharded / SHARDED_CHECKPOINT_NAME / ".metadata").write_bytes(b"")  # a sharded checkpoint is itself
    assert resume_source(TrainConfig(resume=str(sharded / SHARDED_CHECKPOINT_NAME)), sharded) == \
        sharded / SHARDED_CHECKPOINT_NAME
