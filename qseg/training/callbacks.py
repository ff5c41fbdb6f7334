"""What `qseg train` adds to the Trainer's loop: step measurements, the progress bar, the
run's file list after each checkpoint, and the learning rate after --resume."""

from __future__ import annotations

import time
from pathlib import Path

from torch.optim.lr_scheduler import LambdaLR
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from qseg.run_files import record_run_files
from qseg.training.record import GiB, peak_memory_bytes


class StepMonitor(TrainerCallback):
    """Adds tokens/s (non-pad tokens since training began) and peak memory to each log."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()
        self.first_tokens = state.num_input_tokens_seen
        self.first_step = state.global_step  # > 0 when resuming
        self.tokens_per_second = 0.0

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:
            return
        seconds = time.perf_counter() - self.start
        tokens = state.num_input_tokens_seen - self.first_tokens
        self.tokens_per_second = tokens / seconds if seconds > 0 else 0.0
        logs["tokens_per_s"] = round(self.tokens_per_second, 1)
        logs["peak_memory_gb"] = round(peak_memory_bytes() / GiB, 3)


class ResumeOnTheNewSchedule(TrainerCallback):
    """After --resume, the first step's learning rate from the schedule of this run.

    The optimizer comes back with the rate the checkpoint's schedule had reached: 0 at the
    end of a linear decay, when `--max-steps` grows to train on. The schedule itself is
    rebuilt for the new total (its rate functions are not saved), so one step of it, from
    the step before, gives the rate this step should have."""

    def on_train_begin(self, args, state, control, lr_scheduler=None, **kwargs):
        if state.global_step > 0 and isinstance(lr_scheduler, LambdaLR):
            lr_scheduler.last_epoch -= 1
            lr_scheduler.step()


class RecordRunFiles(TrainerCallback):
    """Lists the run's files after each checkpoint (see `qseg.run_files`), so that even an
    interrupted run can be replaced with --overwrite.

    Args:
        output_dir: the run's folder.
    """

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = output_dir

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            record_run_files(self.output_dir)


class ProgressBar(ProgressCallback):
    """Trainer's tqdm bar, with the step logs (loss, tokens/s, memory) in its postfix."""

    def close(self) -> None:
        """Close the bar of a run that stopped early, so an error is the last line shown."""
        if self.training_bar is not None:
            self.training_bar.close()
            self.training_bar = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.training_bar is None or logs is None or "loss" not in logs:
            return super().on_log(args, state, control, logs=logs, **kwargs)
        self.training_bar.set_postfix(
            loss=f"{logs['loss']:.4f}",
            tok_s=f"{logs.get('tokens_per_s', 0):.0f}",
            mem_gb=f"{logs.get('peak_memory_gb', 0):.2f}",
        )
