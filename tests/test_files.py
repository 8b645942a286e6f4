"""sidfast.utils.files.atomic_directory: a directory appears whole or not at all (the checkpoint files' own
atomic writes are tested with the runs: tests/models/test_io.py, tests/training/test_faults.py)."""
import os

import pytest

from sidfast.utils.files import STALE, atomic_directory, remove_stale_temporaries


def _write(files):
    def write(tmp):
        for name, text in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text)
    return write


def _fail_after(files):
    def write(tmp):
        _write(files)(tmp)
        raise OSError(28, "No space left on device")
    return write


def test_a_new_directory_appears_with_every_file_and_the_usual_mode(tmp_path):
    out = atomic_directory(tmp_path / "out", _write({"a.txt": "a", "sub/b.txt": "b"}))
    assert (out / "a.txt").read_text() == "a" and (out / "sub" / "b.txt").read_text() == "b"
    mask = os.umask(0o022)
    os.umask(mask)
    assert (out.stat().st_mode & 0o777) == 0o777 & ~mask  # not mkdtemp's 0700
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_a_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(OSError, match="No space"):
        atomic_directory(tmp_path / "out", _fail_after({"a.txt": "a"}))
    assert os.listdir(tmp_path) == []


def test_an_existing_directory_is_replaced_only_when_asked_and_kept_when_the_new_one_fails(tmp_path):
    out = tmp_path / "out"
    atomic_directory(out, _write({"old.txt": "old"}))
    with pytest.raises(FileExistsError, match="not empty"):
        atomic_directory(out, _write({"new.txt": "new"}))
    with pytest.raises(OSError, match="No space"):
        atomic_directory(out, _fail_after({"new.txt": "new"}), replace=True)
    assert sorted(os.listdir(out)) == ["old.txt"] and sorted(os.listdir(tmp_path)) == ["out"]
    atomic_directory(out, _write({"new.txt": "new"}), replace=True)
    assert sorted(os.listdir(out)) == ["new.txt"] and sorted(os.listdir(tmp_path)) == ["out"]
    (tmp_path / "empty").mkdir()  # an empty directory is simply replaced
    atomic_directory(tmp_path / "empty", _write({"a.txt": "a"}))
    assert os.listdir(tmp_path / "empty") == ["a.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        atomic_directory(tmp_path / "file", _write({"a.txt": "a"}), replace=True)
    assert (tmp_path / "file").read_text() == "x"


def test_the_temporary_of_a_killed_write_is_a_stale_temporary(tmp_path):
    """A process killed while writing leaves its temporary, which ``remove_stale_temporaries`` knows."""
    seen = []
    atomic_directory(tmp_path / "out", lambda tmp: seen.append(tmp.name))
    assert STALE.match(seen[0]) and seen[0].startswith(".out.")
    (tmp_path / seen[0]).mkdir()  # as if the process died before the rename
    removed, _ = remove_stale_temporaries(tmp_path)
    assert removed == [seen[0]] and os.listdir(tmp_path) == ["out"]
