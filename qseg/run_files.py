"""A run's output folder: its file names, its record, where it goes, and when replacing it
loses nothing of the user's.

Every run folder holds `config.yaml` (the resolved config), `run.json` (the run's record,
written by `qseg train` when it ends), `eval.json` (the held-out evaluation, when asked),
the adapter, and `checkpoint-N/` folders.

A run lists every file it has written, with its size and modification time, in
`.qseg-files`: when it starts, after each checkpoint and when it ends. `--overwrite`
replaces a folder only when every file in it, at any depth, is listed there unchanged: a
file a user added or edited anywhere (a note in a checkpoint folder, their own
`config.yaml`) keeps the whole folder. Replacing deletes those files and the folders they
leave empty, never the output folder itself (it may be a link to another disk).
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qseg.config import TrainConfig

RUNS_ROOT = Path("runs")  # where a run goes when no --output-dir is given
CONFIG_FILE = "config.yaml"  # the resolved config
RUN_FILE = "run.json"  # the run's record: config, losses per step, timings, eval summary
EVAL_FILE = "eval.json"  # the held-out evaluation's report
MANIFEST = ".qseg-files"  # every file the run wrote, with its size and time
LOCK_FILE = ".qseg-lock"  # held by the running process (its pid inside)
COMPLETE_MARKER = ".qseg-complete"  # in a checkpoint folder, written once it is whole
# What transformers needs to resume exactly: without any of them a resume would start a
# fresh optimizer, schedule or random stream and silently train differently.
CHECKPOINT_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state.pth")
ADAPTER_FILES = ("adapter_model.safetensors", "model.safetensors")


def read_run(directory: str | Path) -> dict[str, Any]:
    """The ``run.json`` of a qseg run dir.

    A qseg run dir is recognised by its ``run.json`` (written by ``qseg train``) holding the
    run's ``"config"`` object (``model`` None there means the default model).

    Raises:
        FileNotFoundError: ``directory`` does not exist.
        ValueError: it is not a qseg run dir.
    """
    path = Path(directory)
    if not path.is_dir():
        raise FileNotFoundError(f"run dir {path} does not exist or is not a folder")
    run_file = path / RUN_FILE
    not_a_run = f"not a qseg run dir: {path} (expected {RUN_FILE} written by qseg train"
    if not run_file.is_file():
        raise ValueError(f"{not_a_run}; there is none)")
    try:
        run = json.loads(run_file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{not_a_run}; {run_file} is not valid JSON: {error})") from error
    if not isinstance(run, dict) or not isinstance(run.get("config"), dict):
        raise ValueError(f"{not_a_run}, with a 'config' object)")
    return run


def write_json(path: Path, record: dict[str, Any]) -> None:
    """Write a run's JSON file (`run.json`, `eval.json`) as indented UTF-8, whole or not
    at all: it is written beside and renamed into place."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    partial.replace(path)


def check_output_dir(cfg: TrainConfig) -> Path:
    """The run's output dir, after checking that writing there loses nothing.

    Allowed: a new or empty folder; a folder holding a previous run and nothing else, with
    `overwrite` (replaced when training starts); a folder with checkpoints, with `resume`.
    """
    if cfg.output_dir is None:
        if cfg.resume:
            raise ValueError("--resume needs --output-dir: the folder of the run to continue")
        return fresh_run_dir(RUNS_ROOT)
    output_dir = Path(cfg.output_dir)
    if cfg.resume:
        if cfg.overwrite:
            raise ValueError(
                "--resume continues the run in --output-dir and --overwrite replaces it: "
                "pass one of them"
            )
        checkpoint, skipped = (None, [])
        if output_dir.is_dir():
            checkpoint, skipped = last_complete_checkpoint(output_dir)
        if checkpoint is None and not skipped:
            raise ValueError(
                f"--resume: {output_dir} holds no checkpoint-N folder to continue from; "
                "train into it without --resume first"
            )
        if checkpoint is None:
            raise ValueError(
                f"--resume: {output_dir} holds no complete checkpoint to continue from "
                f"(skipped: {'; '.join(skipped)}); train into it again with --overwrite"
            )
        state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
        if cfg.max_steps is not None and state["global_step"] >= cfg.max_steps:
            raise ValueError(
                f"--resume: {output_dir} has already trained {state['global_step']} steps and "
                f"max_steps is {cfg.max_steps}; pass a larger --max-steps to train on"
            )
        return output_dir
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"output dir {output_dir} is a file; choose a folder")
    if not output_dir.is_dir() or not any(p.name != LOCK_FILE for p in output_dir.iterdir()):
        return output_dir
    foreign = foreign_files(output_dir)
    if foreign is None or foreign:
        held = ""
        if foreign:
            held = f" (it holds {', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''})"
        raise ValueError(
            f"output dir {output_dir} is not empty and does not hold a qseg run alone{held}; "
            "choose a new or empty --output-dir"
        )
    if not cfg.overwrite:
        raise ValueError(
            f"output dir {output_dir} holds another run; pass --overwrite to replace it, "
            "--resume to continue it, or choose another --output-dir"
        )
    return output_dir


def fresh_run_dir(root: Path) -> Path:
    """runs/<YYYYmmdd-HHMMSS>, with a -2, -3, ... suffix when that name is taken."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    candidate, n = root / stamp, 1
    while candidate.exists():
        n += 1
        candidate = root / f"{stamp}-{n}"
    return candidate


def record_run_files(output_dir: Path) -> None:
    """List every file now in `output_dir` as written by the run."""
    (output_dir / MANIFEST).write_text(json.dumps(_files(output_dir), indent=0) + "\n")


def foreign_files(output_dir: Path) -> list[str] | None:
    """The files in `output_dir` that its run did not write or that changed since (relative
    paths, sorted); None when no qseg run recorded its files there."""
    manifest = output_dir / MANIFEST
    if not manifest.is_file():
        return None
    written = json.loads(manifest.read_text())
    # A save the run began but never finished (a kill, a full disk) is the run's own too.
    unfinished = {
        path.name
        for path in output_dir.glob("checkpoint-*")
        if path.is_dir() and not (path / COMPLETE_MARKER).exists()
    }
    return sorted(
        path
        for path, stamp in _files(output_dir).items()
        if written.get(path) != stamp and not _unfinished_save(path, unfinished)
    )


# What transformers and peft write into a checkpoint folder (a user's own file there,
# even with one of these names elsewhere, is never taken for the run's).
SAVED_FILES = (
    *CHECKPOINT_FILES,
    *ADAPTER_FILES,
    "adapter_config.json",
    "training_args.bin",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


def _unfinished_save(path: str, unfinished: set[str]) -> bool:
    folder, _, name = path.partition("/")
    return folder in unfinished and name in SAVED_FILES


def clear_run(output_dir: Path) -> None:
    """Delete a previous run's files and the folders they leave empty; keep `output_dir`."""
    for path in _files(output_dir):
        (output_dir / path).unlink()
    for root, folders, _ in os.walk(output_dir, topdown=False):
        for folder in folders:
            if not any(Path(root, folder).iterdir()):
                Path(root, folder).rmdir()
    (output_dir / MANIFEST).unlink(missing_ok=True)


def _files(output_dir: Path) -> dict[str, list[int]]:
    """{relative path: [size, mtime in ns]} of every file and link under `output_dir`
    (links not followed), the manifest left out."""
    found = {}
    for root, folders, files in os.walk(output_dir):
        links = [folder for folder in folders if Path(root, folder).is_symlink()]
        for name in (*files, *links):
            path = Path(root, name)
            relative = path.relative_to(output_dir).as_posix()
            if relative not in (MANIFEST, LOCK_FILE):
                stat = path.lstat()
                found[relative] = [stat.st_size, stat.st_mtime_ns]
    return found


def _step(folder: Path) -> int:
    return int(folder.name.removeprefix("checkpoint-"))


def checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` cannot be resumed from, or None when it is complete."""
    missing = [name for name in CHECKPOINT_FILES if not (folder / name).is_file()]
    if not any((folder / name).is_file() for name in ADAPTER_FILES):
        missing.append("the adapter weights")
    if missing:
        return f"missing {', '.join(missing)}"
    if not (folder / COMPLETE_MARKER).is_file():
        return "not marked complete (the save was interrupted)"
    weights = folder / ADAPTER_FILES[0]
    if weights.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(weights), framework="pt") as weights_file:
                weights_file.metadata()
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
            return f"unreadable {weights.name} ({err})"
    try:
        json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError) as err:
        return f"unreadable trainer_state.json ({err})"
    return None


def last_complete_checkpoint(output_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest complete `checkpoint-N` of a run, and a line per newer one skipped.

    Args:
        output_dir: the run's folder.

    Returns:
        (the checkpoint folder or None, ["checkpoint-N: why", ...]).
    """
    folders = [
        path
        for path in output_dir.glob("checkpoint-*")
        if path.is_dir() and path.name.removeprefix("checkpoint-").isdigit()
    ]
    skipped = []
    for folder in sorted(folders, key=_step, reverse=True):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder, skipped
        skipped.append(f"{folder.name}: {problem}")
    return None, skipped
