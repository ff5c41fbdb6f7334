"""The harness the benchmarks share: inputs, measurement, one process per case, output.

Measuring memory honestly:
- CPU: each case runs in a fresh Python process started with `MALLOC_MMAP_THRESHOLD_=65536`
  (glibc then maps every allocation over 64 KiB on its own and returns it on free, so
  the figure repeats run to run). Just before the measured call the process writes `5`
  to `/proc/self/clear_refs`, which restarts the kernel's peak-RSS counter; the peak is
  `VmHWM` after the call minus `VmRSS` before it. Inputs exist before, so they are excluded.
- CUDA: `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()`, minus the
  memory allocated before the call (the inputs). Cases run in one process unless asked.

Either way the figure is the peak memory ADDED by one forward+backward, gradients
included; times are the median of several forward+backward calls after a warm-up call.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from qseg.loss_text import format_losses, parse_losses
from qseg.losses import canonical_name

REPO_ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20
ROW_FIELDS = ("impl", "loss", "tokens", "vocab", "hidden", "dtype", "device", "peak_mb", "ms")
IGNORE_INDEX = -100
# The worker prints its row on a line starting with this, so that library chatter on
# stdout cannot be mistaken for it.
ROW_MARKER = "QSEG_BENCH_ROW "
# Mixtures were once written `a:0.6+b:0.4`; a "+" before a digit is an exponent's (1e+06).
_OLD_SEPARATOR = re.compile(r"\+(?=[A-Za-z_])")
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


# ----------------------------------------------------------------------------- inputs


def parse_dtype(name: str) -> torch.dtype:
    """`"bf16"`/`"bfloat16"` (and fp32, fp16) to a torch dtype.

    Args:
        name: a key of `DTYPES`.

    Returns:
        The dtype.
    """
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; allowed: {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """The name rows give a dtype, e.g. "bfloat16".

    Args:
        dtype: a torch dtype.

    Returns:
        Its name without "torch.".
    """
    return str(dtype).removeprefix("torch.")


def resolve_device(name: str) -> torch.device:
    """`"auto"` takes CUDA when present; asking for CUDA without one is an error.

    Args:
        name: `--device`: cpu, cuda (or cuda:N) or auto.

    Returns:
        The device.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is visible; use cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu, cuda or auto; got {name!r}")
    return device


def device_name(device: torch.device) -> str:
    """The card's name (as `torch.cuda.get_device_name` gives it), or `"cpu"`.

    Args:
        device: a CPU or CUDA device.

    Returns:
        The name rows carry in `device`.
    """
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def zipf_labels(
    batch: int,
    seq_len: int,
    vocab: int,
    *,
    generator: torch.Generator,
    exponent: float = 1.1,
    ignore_fraction: float = 0.1,
) -> torch.Tensor:
    """(batch, seq_len) labels shaped like text: token frequencies follow a Zipf law.

    The token of frequency rank k is drawn with probability ∝ 1 / (k + 1)^exponent
    (natural-language corpora sit near exponent 1), ranks are mapped to ids by a random
    permutation, and `ignore_fraction` of the positions are set to IGNORE_INDEX (as
    prompt tokens would be). The number of distinct classes in a batch, which sizes the
    region losses' work, is then realistic rather than that of uniform labels.
    """
    weights = torch.arange(1, vocab + 1, dtype=torch.float64).pow(-exponent)
    ranks = torch.multinomial(weights, batch * seq_len, replacement=True, generator=generator)
    labels = torch.randperm(vocab, generator=generator)[ranks].view(batch, seq_len)
    ignored = torch.rand(batch, seq_len, generator=generator) < ignore_fraction
    return labels.masked_fill(ignored, IGNORE_INDEX)


def parse_losses_text(text: str) -> dict[str, dict[str, Any]]:
    """A mixture's text form, as `qseg train --loss` reads it, to the losses it names.

    Args:
        text: e.g. `lovasz` or `cross_entropy:0.6,generalized_dice:0.4`.

    Returns:
        `{canonical name: {"weight": w, **params}}`, as `qseg.losses.normalize_losses`.

    Raises:
        ValueError: an unknown loss or parameter, a weight that is not a number, or the
            older `a:0.6+b:0.4` form.
    """
    if _OLD_SEPARATOR.search(text):
        raise ValueError(
            f"loss mixture {text!r}: write it as name:weight,name:weight "
            "(e.g. cross_entropy:0.6,lovasz:0.4)"
        )
    try:
        return parse_losses(text)
    except ValueError as error:
        raise ValueError(f"{error} (a mixture is written name:weight,name:weight)") from None


def losses_label(losses: Mapping[str, Any]) -> str:
    """The text form of `losses` for rows and tables; one loss of weight 1 is its bare name.

    Args:
        losses: as `parse_losses_text` returns them (or plain weights, name -> w).

    Returns:
        e.g. `lovasz` or `cross_entropy:0.6,generalized_dice:0.4`.
    """
    text = format_losses(losses)
    name, _, rest = text.partition(":")
    return name if rest == "1" else text


def read_losses_label(text: str) -> str:
    """A stored row's `loss` in today's text form; rows of earlier runs may carry the older
    `a:0.6+b:0.4` form, which is read too.

    Args:
        text: the row's `loss`.

    Returns:
        The label `losses_label` writes for the same losses.
    """
    return losses_label(parse_losses_text(_OLD_SEPARATOR.sub(",", text)))


# ------------------------------------------------------------------ argument types
# argparse calls these on the command line, so bad input is refused before any case runs.


def loss_arg(text: str) -> str:
    """A loss name or alias, as its canonical name (rows and verdicts use those).

    Args:
        text: the flag's value.

    Returns:
        The canonical name.
    """
    try:
        return canonical_name(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def losses_arg(text: str) -> str:
    """A loss mixture in its text form (`parse_losses_text`), checked and written again
    with canonical names (`losses_label`).

    Args:
        text: the flag's value.

    Returns:
        The mixture's label, e.g. `cross_entropy:0.6,generalized_dice:0.4`.
    """
    try:
        return losses_label(parse_losses_text(text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1.

    Args:
        text: the flag's value.

    Returns:
        The number.
    """
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {text!r}")
    return int(text)


def positive_float(text: str) -> float:
    """An argparse type: a finite number above 0.

    Args:
        text: the flag's value.

    Returns:
        The number.
    """
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number; got {text!r}")
    return value


# ------------------------------------------------------------------------ measurement


def proc_status_kb(field: str) -> int:
    """One memory field of `/proc/self/status` (VmRSS, VmHWM...).

    Args:
        field: the field's name.

    Returns:
        Its value in KiB.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def peak_added_mb(call: Callable[[], Any], device: torch.device) -> float:
    """Peak memory added while `call()` runs, in MiB (see the module docstring).

    Args:
        call: the measured call.
        device: where it allocates.

    Returns:
        The peak above what was allocated before the call.
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        call()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / MiB
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":
        raise RuntimeError(
            "CPU peaks need a process started with MALLOC_MMAP_THRESHOLD_=65536; "
            "run the case through run_isolated"
        )
    before = proc_status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    call()
    return (proc_status_kb("VmHWM") - before) / 1024


def median_ms(
    call: Callable[[], Any], reset: Callable[[], None], device: torch.device, reps: int
) -> float:
    """Median wall time of `reps` calls in milliseconds, `reset()` run before each, untimed.

    Args:
        call: the timed call.
        reset: run before each call, outside the timing.
        device: CUDA calls are synchronized around.
        reps: how many calls.

    Returns:
        The median in milliseconds.
    """
    times = []
    for _ in range(reps):
        reset()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure(
    call: Callable[[], Any], reset: Callable[[], None], device: torch.device, reps: int
) -> tuple[float, float]:
    """(peak added MiB, median ms) of `call`, a forward+backward.

    One warm-up call first, at full size, so that kernel compilation, autotuning and
    one-time workspaces stay out of both figures; then the memory call; then the timed ones.

    Args:
        call: the forward+backward.
        reset: undoes what a call leaves (gradients), run before each call.
        device: where it runs.
        reps: timed calls.

    Returns:
        (peak added MiB, median ms).
    """
    reset()
    call()
    reset()
    peak = peak_added_mb(call, device)
    return peak, median_ms(call, reset, device, reps)


def kernel_profile(call: Callable[[], Any], device: torch.device, top: int = 12) -> dict:
    """Where one call of `call` spends its time: on CUDA its kernels (device time), on a CPU
    its operators (self CPU time), the `top` largest by name, and their totals.

    `device_ms` far below the call's wall time means the device waits on the host
    (launches, Python), not on its kernels.

    Args:
        call: the profiled call.
        device: where it runs.
        top: how many of the largest to keep.

    Returns:
        `device_ms`, `launches` and `top` (name, calls, ms of each).
    """
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    if device.type == "cuda":
        # The kernels themselves: the operator that launches one reports its time too.
        averages = prof.key_averages()
        kernels = [e for e in averages if e.device_type == torch.autograd.DeviceType.CUDA]
        events = [(e.key, e.count, e.self_device_time_total) for e in kernels]
    else:
        events = [(e.key, e.count, e.self_cpu_time_total) for e in prof.key_averages()]
    events.sort(key=lambda e: e[2], reverse=True)
    return {
        "device_ms": sum(e[2] for e in events) / 1e3,
        "launches": sum(e[1] for e in events),
        "top": [{"name": k[:100], "calls": n, "ms": us / 1e3} for k, n, us in events[:top]],
    }


def clear_grads(*tensors: torch.Tensor) -> Callable[[], None]:
    """A `reset` for `measure`: drop the gradients the last call left.

    Args:
        tensors: the tensors whose `.grad` is dropped.

    Returns:
        The reset function.
    """

    def reset() -> None:
        for t in tensors:
            t.grad = None

    return reset


def is_oom(error: BaseException) -> bool:
    """Whether `error` is a device (or host) out-of-memory error.

    Args:
        error: the caught exception.

    Returns:
        True for out of memory.
    """
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


# --------------------------------------------------------------- one process per case


def run_isolated(module: str, case: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run `python -m module --case JSON` in a fresh process and return the row it prints.

    A crash, a timeout or a missing row becomes the case's row with an `error`.

    Args:
        module: the worker, e.g. "benchmarks.loss_memory".
        case: the case, passed as JSON.
        timeout: seconds before the worker is killed.

    Returns:
        The worker's row, or an error row (`status` "timeout" after a timeout).
    """
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    # A few small kernels to compile: concurrent workers should not each start a pool of
    # compiler processes as large as the machine.
    env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    command = [sys.executable, "-m", module, "--case", json.dumps(case)]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO_ROOT
        )
        stdout, stderr = done.stdout, done.stderr
    except subprocess.TimeoutExpired as expired:
        stdout, stderr, done = _text(expired.stdout), _text(expired.stderr), None
    for line in reversed(stdout.splitlines()):
        if line.startswith(ROW_MARKER):  # also when it was slow to exit after its row
            return json.loads(line[len(ROW_MARKER) :])
    if done is None:
        return {**error_row(case, f"timed out after {timeout:.0f} s"), "status": "timeout"}
    tail = (stderr.strip().splitlines() or ["no output"])[-1]
    return error_row(case, f"worker exited with {done.returncode}: {tail}")


def _text(output: str | bytes | None) -> str:
    """A timed-out run's captured output (bytes on some Pythons even with text=True)."""
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def emit_row(row: dict[str, Any]) -> None:
    """The worker's side of `run_isolated`: print the row where it looks for it.

    Args:
        row: JSON-serialisable.
    """
    print(ROW_MARKER + json.dumps(row), flush=True)


def error_row(case: dict[str, Any], message: str) -> dict[str, Any]:
    """The case's own fields (model, cap, ... too) with the error in place of figures.

    Args:
        case: the case that failed.
        message: what went wrong.

    Returns:
        The row.
    """
    row = {**{key: None for key in ROW_FIELDS}, **case}
    row.update(peak_mb=None, ms=None, error=message)
    return row


def skipped_row(case: dict[str, Any], reason: str) -> dict[str, Any]:
    """A row for a case that cannot run here, saying why.

    Args:
        case: the case.
        reason: why it was skipped.

    Returns:
        The row, with `skipped` and no figures.
    """
    row = {key: case.get(key) for key in ROW_FIELDS}
    row.update(peak_mb=None, ms=None, skipped=reason)
    return row


def measured(row: dict[str, Any]) -> bool:
    """True for rows that carry figures (not skipped, not failed).

    Args:
        row: a result row.

    Returns:
        Whether it was measured.
    """
    return "skipped" not in row and "error" not in row


# ----------------------------------------------------------------------------- output


def add_output_args(parser: argparse.ArgumentParser) -> None:
    """Flags every benchmark takes: device, quick mode, output, and the worker's entry.

    Args:
        parser: the benchmark's parser; changed in place.
    """
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    parser.add_argument(
        "--quick", action="store_true", help="tiny shapes, to check the script runs"
    )
    parser.add_argument("--out", type=Path, help="write the rows as JSON to this file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    parser.add_argument("--case", help=argparse.SUPPRESS)


def check_out_path(path: Path | None, overwrite: bool) -> None:
    """Refuse, before any work, to replace an existing output file unless told to.

    Args:
        path: `--out` (None: no file).
        overwrite: `--overwrite`.
    """
    if path is not None and path.exists() and not overwrite:
        raise SystemExit(f"{path} exists; pass --overwrite to replace it or choose another --out")


def write_json(rows: Sequence[dict[str, Any]], path: Path, quiet: bool = False) -> None:
    """Write the rows; benchmarks call it after every case too, so a run cut short by a
    timeout still leaves what it measured.

    Args:
        rows: the rows so far.
        path: the JSON file.
        quiet: do not print a line saying so.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written whole, then renamed: a run killed mid-write leaves the last complete file.
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(list(rows), indent=1) + "\n")
    partial.replace(path)
    if not quiet:
        print(f"wrote {path} ({len(rows)} rows)")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.2f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def markdown_table(rows: Iterable[dict[str, Any]], columns: Sequence[str]) -> str:
    """A markdown table of `columns`; a `note` column says why a row was skipped or failed.

    Args:
        rows: result rows.
        columns: the row keys to show.

    Returns:
        The table's text.
    """
    lines = ["| " + " | ".join((*columns, "note")) + " |", "|" + "---|" * (len(columns) + 1)]
    for row in rows:
        note = row.get("skipped") or row.get("error") or row.get("note") or ""
        cells = [_cell(row.get(c)) for c in columns] + [str(note).replace("|", "/")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
