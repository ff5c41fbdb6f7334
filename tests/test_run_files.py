"""qseg.run_dir: --overwrite replaces a previous run and never a file of the user's."""

import os
from pathlib import Path

import pytest

from qseg.config import TrainConfig
from qseg.run_files import check_output_dir, clear_run, record_run_files


def make_run(folder: Path) -> Path:
    """A folder as a finished run leaves it (its files' names as a real run's)."""
    (folder / "checkpoint-2").mkdir(parents=True)
    for name in ("config.yaml", "run.json", "README.md", "tokenizer.json", "adapter_config.json"):
        (folder / name).write_text(name)
    (folder / "checkpoint-2" / "optimizer.pt").write_bytes(b"\0" * 64)
    record_run_files(folder)
    return folder


def overwrite(folder: Path) -> Path:
    return check_output_dir(TrainConfig(output_dir=str(folder), overwrite=True))


def test_a_recorded_run_is_replaced_only_when_asked(tmp_path):
    run = make_run(tmp_path / "run")
    with pytest.raises(ValueError, match="holds another run; pass --overwrite"):
        check_output_dir(TrainConfig(output_dir=str(run)))
    assert overwrite(run) == run
    clear_run(run)
    assert run.is_dir() and list(run.iterdir()) == []


@pytest.mark.parametrize(
    "mine",
    ["notes.md", "checkpoint-2/notes.md", "tokenizer_backup_mine.json", "README.md", "config.yaml"],
)
def test_a_file_added_or_edited_anywhere_keeps_the_folder(tmp_path, mine):
    run = make_run(tmp_path / "run")
    (run / mine).write_text("mine, longer than what the run wrote")
    with pytest.raises(ValueError, match=f"does not hold a qseg run alone \\(it holds {mine}"):
        overwrite(run)
    assert (run / mine).read_text().startswith("mine")


def test_a_folder_no_run_recorded_is_never_replaced(tmp_path):
    """A project folder that holds a config.yaml of its own (or an older run) is kept."""
    (tmp_path / "config.yaml").write_text("model: mine  # my notes\n")
    with pytest.raises(ValueError, match="not empty and does not hold a qseg run alone;"):
        overwrite(tmp_path)


def test_a_linked_output_dir_is_cleared_through_the_link(tmp_path):
    """A link to a scratch disk: empty, it is used as it is; holding a run, the run's
    files go and the link stays."""
    target, link = tmp_path / "scratch", tmp_path / "out"
    target.mkdir()
    link.symlink_to(target)
    assert overwrite(link) == link
    make_run(link)
    assert overwrite(link) == link
    clear_run(link)
    assert link.is_symlink() and list(target.iterdir()) == []


def test_links_inside_a_run_are_not_the_runs(tmp_path):
    run = make_run(tmp_path / "run")
    (tmp_path / "data").mkdir()
    os.symlink(tmp_path / "data", run / "data")
    with pytest.raises(ValueError, match="it holds data"):
        overwrite(run)
