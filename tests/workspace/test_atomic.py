"""Atomic output folders and zips: the output appears whole or not at all, and bad output paths get one sentence.

Crashes are simulated by raising inside the write (an interrupted write, a disk that fills up midway); a reader
looks at the destination while the write is under way."""
import errno
import os
import zipfile
from pathlib import Path

import pytest

from slimgpt_core.base.errors import SlimGPTError
from slimgpt_core.base.atomic import atomic_folder, atomic_zip, check_output_folder


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_output_folder_rules(tmp_path, monkeypatch):
    nested = tmp_path / "a" / "b" / "run"
    assert check_output_folder(str(nested)) == nested and nested.parent.is_dir() and not nested.exists()
    assert check_output_folder(nested) == nested  # the parent exists now: fine again
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert check_output_folder("~/runs/x") == tmp_path / "home" / "runs" / "x" and (tmp_path / "home" / "runs").is_dir()

    empty = tmp_path / "empty"
    empty.mkdir()
    assert check_output_folder(empty) == empty  # an empty folder is not in the way
    full = tmp_path / "full"
    full.mkdir()
    (full / "weights").write_text("old")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for taken in (full, a_file):
        with pytest.raises(SlimGPTError) as err:
            check_output_folder(taken)
        assert str(err.value) == (f"output folder {taken} already exists and is not empty "
                                  "(choose another --out or pass --force)")
        assert check_output_folder(taken, overwrite=True) == taken
    assert _tree(full) == {"weights": "old"}  # only checked, nothing removed yet

    with pytest.raises(SlimGPTError) as err:  # the parent is a file: it cannot be created
        check_output_folder(a_file / "run")
    assert str(err.value) == f"cannot create the output folder's parent {a_file}: File exists"
    unwritable = _unwritable_folder(tmp_path)
    with pytest.raises(SlimGPTError) as err:
        check_output_folder(unwritable / "slimgpt-run")
    assert str(err.value) == f"cannot write into {unwritable}"


def _unwritable_folder(tmp_path):
    """A folder this user cannot write into: a read-only one, or (root ignores modes) /proc/sys."""
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o555)
    for folder in (read_only, Path("/proc/sys")):
        if folder.is_dir() and not os.access(folder, os.W_OK):
            return folder
    pytest.fail("no folder here that this user cannot write into")


def test_folder_appears_whole_and_replaces_the_old_one(tmp_path):
    out = tmp_path / "run"
    with atomic_folder(out) as tmp:
        # written into a hidden sibling (same file system, so the rename is atomic; hidden from listings)
        assert tmp.is_dir() and tmp.parent == tmp_path and tmp.name.startswith(".run.tmp-")
        (tmp / "weights").write_text("new")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "report.json").write_text("{}")
        assert not out.exists()  # a reader during the write sees nothing yet
    assert _tree(out) == {"weights": "new", "sub/report.json": "{}"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no temporary folder left

    with atomic_folder(out, overwrite=True) as tmp:
        (tmp / "other").write_text("newer")
        assert _tree(out) == {"weights": "new", "sub/report.json": "{}"}  # the old run, whole, until the end
    assert _tree(out) == {"other": "newer"}  # replaced, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]

    with pytest.raises(SlimGPTError, match="already exists and is not empty"):
        with atomic_folder(out):
            pytest.fail("a taken folder must be refused before anything is written")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("overwrite", [False, True])
def test_interrupted_write_keeps_nothing_new(tmp_path, overwrite):
    out = tmp_path / "run"
    if overwrite:
        out.mkdir()
        (out / "weights").write_text("old")
    failure = Interrupted("stopped midway")
    with pytest.raises(Interrupted) as err:
        with atomic_folder(out, overwrite=overwrite) as tmp:
            (tmp / "weights").write_text("half")
            raise failure
    assert err.value is failure  # not wrapped, not swallowed
    assert sorted(p.name for p in tmp_path.iterdir()) == (["run"] if overwrite else [])
    if overwrite:
        assert _tree(out) == {"weights": "old"}  # the old run survives a failed replacement


@pytest.mark.parametrize("error,sentence", [
    (OSError(errno.ENOSPC, "No space left on device"), "No space left on device (disk full)"),
    (OSError(errno.EIO, "Input/output error"), "Input/output error"),
    (OSError("the writer gave up"), "the writer gave up"),  # no strerror: the error's own text
])
def test_disk_errors_midway_are_one_sentence_and_leave_nothing(tmp_path, error, sentence):
    out = tmp_path / "run"
    with pytest.raises(SlimGPTError) as err:
        with atomic_folder(out) as tmp:
            (tmp / "weights").write_text("half")
            raise error
    assert str(err.value) == f"could not write {out}: {sentence}; nothing was kept"
    assert err.value.__cause__ is None and err.value.__suppress_context__
    assert list(tmp_path.iterdir()) == []


def test_zip_is_written_whole(tmp_path, monkeypatch):
    folder = tmp_path / "run"
    (folder / "sub").mkdir(parents=True)
    (folder / "weights").write_text("w" * 1000)
    (folder / "sub" / "report.json").write_text("{}")
    target = tmp_path / "run.zip"
    target.write_text("an older zip")
    assert atomic_zip(folder, str(target)) == target
    with zipfile.ZipFile(target) as z:
        assert {n: z.read(n).decode() for n in z.namelist() if not n.endswith("/")} == _tree(folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "run.zip"]

    # the disk fills up after the first file went into the archive: the old zip stays, no temporary file is left
    target.write_text("an older zip")
    real_write = zipfile.ZipFile.write

    written_to = []

    def write_then_fill_up(self, filename, *args, **kwargs):
        written_to.append(Path(self.filename))
        if self.namelist():
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, filename, *args, **kwargs)

    with monkeypatch.context() as patched, pytest.raises(SlimGPTError) as err:
        patched.setattr(zipfile.ZipFile, "write", write_then_fill_up)
        atomic_zip(folder, target)
    assert str(err.value) == f"could not write {target}: No space left on device"
    assert target.read_text() == "an older zip"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "run.zip"]
    # the archive was being written beside the target (same file system: the rename is atomic), hidden
    assert written_to[0].parent == tmp_path and written_to[0].name.startswith(".run.tmp-")

    with pytest.raises(SlimGPTError) as err:  # nothing to zip: fails before any archive exists
        atomic_zip(tmp_path / "missing", target)
    assert str(err.value) == f"could not write {target}: No such file or directory"
    assert target.read_text() == "an older zip" and sorted(p.name for p in tmp_path.iterdir()) == ["run", "run.zip"]

    blocked = tmp_path / "blocked.zip"  # a folder where the zip should go: the rename fails
    blocked.mkdir()
    (blocked / "keep").write_text("x")
    with pytest.raises(SlimGPTError) as err:
        atomic_zip(folder, blocked)
    assert str(err.value) == f"could not write {blocked}: Is a directory"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocked.zip", "run", "run.zip"]


def test_save_run_is_listed_under_its_label(tmp_path, assets_root):
    """A run written anywhere carries the workspace's meta.json: labelled as asked, else by its folder's name."""
    from slimgpt_core.base.events import RunReport
    from slimgpt_core.models import load_model
    from slimgpt_core.workspace.store import save_run_at
    from slimgpt_core.workspace.store import read_run

    loaded = load_model("stories260k", "cpu")
    report = RunReport("stories260k", {"method": "slimgpt", "ratio": 0.2}, [0.2], [0.2], 100, 80, 90, 70)
    out = save_run_at(loaded.model, loaded.tokenizer, report, tmp_path / "my-run")
    assert out == tmp_path / "my-run" and read_run(out).label == "my-run"
    assert read_run(out).summary["params_after"] == 80 and (out / "report.json").exists()
    with pytest.raises(SlimGPTError, match="already exists and is not empty"):
        save_run_at(loaded.model, loaded.tokenizer, report, out, label="again")
    (out / "stale").write_text("from the old run")
    assert save_run_at(loaded.model, loaded.tokenizer, report, out, overwrite=True, label="Second try") == out
    assert read_run(out).label == "Second try" and not (out / "stale").exists()
