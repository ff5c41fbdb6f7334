"""What keeps a run's folder sound through crashes, full disks, divergence and a second run.

- A checkpoint is complete only once qseg has marked it, after transformers finished
  writing it: a kill or a full disk mid-save leaves an unmarked folder, which `--resume`
  skips, naming it, for the newest complete one.
- A run holds an advisory lock on its output folder for its whole life: a second run into
  the same folder stops at once, naming the process; a crash releases the lock.
- A step whose adapter weights are no longer finite stops the run, before that step's
  checkpoint or adapter is written.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import torch
from transformers import TrainerCallback

from qseg.run_files import COMPLETE_MARKER, LOCK_FILE, last_complete_checkpoint

log = logging.getLogger(__name__)


class MarkCompleteCheckpoints(TrainerCallback):
    """Marks each checkpoint complete once transformers has written all of it."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                (folder / COMPLETE_MARKER).write_text(json.dumps({"step": state.global_step}))


class StopOnNonFinite(TrainerCallback):
    """Stops the run at the first step whose trainable weights are not finite, before that
    step's checkpoint is written: a diverged run must not pass for a trained one."""

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = output_dir

    def on_step_end(self, args, state, control, model=None, **kwargs):
        trainable = [p for p in model.parameters() if p.requires_grad]
        if all(bool(torch.isfinite(p).all()) for p in trainable):
            return
        last, _ = last_complete_checkpoint(self.output_dir)
        kept = f"the last finite checkpoint is {last}" if last else "no checkpoint was kept"
        losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
        loss = f" (last logged loss {losses[-1]})" if losses and math.isfinite(losses[-1]) else ""
        raise ValueError(
            f"training diverged at step {state.global_step}: the adapter's weights are no "
            f"longer finite{loss}; {kept}; lower --lr (or raise --warmup-steps) and train again"
        )


@contextmanager
def run_lock(output_dir: Path) -> Iterator[IO[str]]:
    """Hold the output folder's lock for the block (the folder is created if needed).

    Raises:
        ValueError: another process holds it, named by its pid.
    """
    created = not output_dir.exists()
    output_dir.mkdir(parents=True, exist_ok=True)
    handle = open(output_dir / LOCK_FILE, "a+")  # noqa: SIM115 - held for the whole run
    acquired = False
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise ValueError(
                f"output dir {output_dir} is in use by another qseg run (pid {holder}); "
                "wait for it to end or choose another --output-dir"
            ) from None
        acquired = True
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield handle
    finally:
        handle.close()
        # A run stopped by bad input leaves the folder as it found it.
        if acquired and [p.name for p in output_dir.iterdir()] == [LOCK_FILE]:
            (output_dir / LOCK_FILE).unlink(missing_ok=True)
            if created:
                output_dir.rmdir()


def out_of_space(err: OSError, what: Path) -> ValueError:
    """The one-line error for a save that ran out of disk space."""
    return ValueError(
        f"out of disk space while writing {what}: free some space, then --resume from the "
        "last complete checkpoint (an interrupted one is skipped) or start again with "
        "--overwrite"
    )
