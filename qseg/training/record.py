"""What a run leaves to read: its peak memory, its record (`run.json`) and the summary
printed when it ends."""

from __future__ import annotations

import importlib.metadata
import resource
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import qseg
from qseg.config import TrainConfig
from qseg.data import is_one_file
from qseg.eval import format_table
from qseg.models import LoadedModel, describe, output_head
from qseg.run_files import CONFIG_FILE, EVAL_FILE, RUN_FILE
from qseg.training.trainer import LossTrainer, uses_checkpointing

if TYPE_CHECKING:
    from qseg.training.callbacks import StepMonitor

GiB = 1 << 30


def peak_memory_bytes() -> int:
    """CUDA's peak allocated memory on a GPU, else this process's peak resident memory."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def reset_peak_memory() -> None:
    """Start CUDA's peak count afresh, so that loading the model does not count. A CPU
    process's peak resident memory cannot be reset: there it includes the loading."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def run_record(
    cfg: TrainConfig,
    loaded: LoadedModel,
    trainer: LossTrainer,
    metrics: dict[str, float],
    monitor: StepMonitor,
    train_seconds: float,
    evaluation: dict[str, Any] | None,
) -> dict[str, Any]:
    """What `run.json` holds: how the run was set up, what it did, and how it scored.

    Args:
        cfg: the run's config.
        loaded: the model trained.
        trainer: the Trainer, after training.
        metrics: the metrics `trainer.train()` returned.
        monitor: the run's `StepMonitor`.
        train_seconds: how long `trainer.train()` took.
        evaluation: the held-out evaluation (`qseg.eval.evaluate`), or None.

    Returns:
        The record; the recipe adds "output_dir" and "data".
    """
    model = describe(loaded)
    # The loss of every optimizer step, from the Trainer's log (restored on --resume).
    step_losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    head = output_head(loaded.model)
    vocab, hidden_dim = head.weight.shape[0], head.in_features
    if cfg.chunk_size == "auto":
        chunk_plan = trainer.chunk_plans(vocab, hidden_dim, loaded.dtype)
    else:
        chunk_plan = {"rows": cfg.chunk_size}
    return {
        "qseg_version": qseg.__version__,
        "versions": library_versions(),
        "model": model["source"],
        "backend": loaded.backend,
        "quantization": loaded.quantization,
        "dtype": model["dtype"],
        "loss": cfg.loss,
        "ce_scope": cfg.ce_scope,
        "gradient_checkpointing": uses_checkpointing(cfg),
        "processes": trainer.accelerator.num_processes,
        "steps": trainer.state.global_step,
        "steps_this_run": trainer.state.global_step - monitor.first_step,
        "losses": step_losses,
        "final_loss": step_losses[-1] if step_losses else None,
        "train_seconds": round(train_seconds, 2),
        "tokens_per_second": round(monitor.tokens_per_second, 1),
        "peak_memory_bytes": peak_memory_bytes(),
        "peak_memory_kind": "cuda_max_allocated" if torch.cuda.is_available() else "cpu_peak_rss",
        "chunk_plan": chunk_plan,
        "trainer_metrics": metrics,
        "model_info": model,
        "eval": evaluation["summary"] if evaluation is not None else None,
        "config": cfg.to_dict(),
    }


def library_versions() -> dict[str, str]:
    """Versions of the libraries a run's results depend on (those installed); torch's
    with its build (e.g. 2.11.0+cu130), which the package metadata may leave out."""
    versions = {"torch": torch.__version__}
    for name in ("transformers", "peft", "accelerate", "bitsandbytes", "unsloth"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


# What "next:" suggests trying (a --loss argument and the loss it adds): the first whose
# loss the run did not use.
OTHER_LOSSES = (("focal:1:gamma=3", "focal"), ("cross_entropy:0.6,lovasz:0.4", "lovasz"))


def summary(record: dict[str, Any]) -> str:
    """What a user reads after training: the result, where it is, and what to try next.

    Args:
        record: the run's record, as `train` returns it.

    Returns:
        The text to print, several lines.
    """
    out = record["output_dir"]
    step_losses = record["losses"]
    lines = [
        "",
        f"trained {_steps(record)} of {record['model']} ({record['backend']}, "
        f"{record['quantization']}) in {record['train_seconds']:.0f} s, "
        f"{record['tokens_per_second']:.0f} tokens/s, "
        f"peak memory {record['peak_memory_bytes'] / GiB:.2f} GiB",
        f"loss {step_losses[0]:.4f} -> {step_losses[-1]:.4f}"
        if step_losses
        else "no optimizer step was taken",
    ]
    if record["eval"] is not None:
        lines += ["", f"held-out evaluation ({out}/{EVAL_FILE}):", format_table(record["eval"])]
    run, config = shlex.quote(out), shlex.quote(str(Path(out) / CONFIG_FILE))
    loss_arg, name = next((arg, name) for arg, name in OTHER_LOSSES if name not in record["loss"])
    other = shlex.quote(f"{out}-{name}")
    # A run trained on one file has no held-out split to score: the user names one.
    test_data = " --dataset TEST_FILE" if is_one_file(record["config"]["dataset"]) else ""
    next_steps = {
        "score more held-out problems": f"qseg eval --adapter {run}{test_data} --limit 50",
        # the same run (its saved config) with only the loss changed
        "train with another loss": (
            f"qseg train --config {config} --loss {loss_arg} --output-dir {other}"
        ),
        "compare the two runs": f"qseg compare {run} {other}",
    }
    if record["peak_memory_kind"] == "cuda_max_allocated":  # days of training on a CPU
        next_steps["the paper's GSM8K recipe"] = "qseg train --preset paper-gsm8k"
    lines += [
        "",
        f"adapter: {out}  (load with PeftModel.from_pretrained(base_model, {str(out)!r}))",
        f"record:  {Path(out) / RUN_FILE}",
        "",
        "next:",
        *(f"  {what + ':':<30} {command}" for what, command in next_steps.items()),
    ]
    return "\n".join(lines)


def _steps(record: dict[str, Any]) -> str:
    """'30 steps', or after --resume '3 steps (1 in this run)': time and tokens/s are this
    run's."""
    steps, now = record["steps"], record["steps_this_run"]
    text = f"{steps} step{'' if steps == 1 else 's'}"
    return text if now == steps else f"{text} ({now} in this run)"
