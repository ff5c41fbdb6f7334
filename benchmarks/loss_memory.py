"""Peak added memory and time of one loss forward+backward: qseg vs full logits vs the field.

For every loss of `qseg.losses.available_losses()`:
- `naive`: full logits `hidden @ Wᵀ`, then `qseg.losses.loss_from_logits` (the paper's way);
- `qseg`: `qseg.losses.fused_linear_loss(hidden, W, labels, loss, chunk_size=...)`;
and, cross-entropy only:
- `torch`: `F.cross_entropy` on full logits upcast to float32 (what Hugging Face models do),
  the baseline of the `*_vs_torch_ce` columns (`peak_vs_naive`: qseg against the same
  loss's naive row; `*_vs_liger`: against Liger, when it ran);
- `liger`: Liger-Kernel's `LigerFusedLinearCrossEntropyLoss` (CUDA only);
- `cce`: Apple's `cut_cross_entropy.linear_cross_entropy` (CUDA only).
`--losses` also takes mixtures and parameters in their text form
(`cross_entropy:1:label_smoothing=0.1`); `--logit-softcap C` adds naive and qseg cases
with soft-capped logits (c·tanh(z / c), Gemma 2's), and `peak_vs_qseg_ce` holds a qseg
row against qseg's plain cross-entropy, the bound of those options (at most 1.1x).
An implementation that cannot run here gives a row with `skipped` and the reason.

Inputs: hidden (B, T, d) ~ N(0, 1) and weight (V, d) ~ N(0, 1/d), both in the benchmark
dtype and both requiring grad (as in Liger's benchmark: a trainable head); labels drawn
from a Zipf law over the vocabulary with 10% of positions ignored (see
`common.zipf_labels`). `peak_mb` is the memory added by forward+backward (gradients
included, inputs excluded); `ms` the median forward+backward time. How both are measured
is in `benchmarks/common.py`; on CPU every case runs in its own process on one thread
(`--threads`), so that other load on a shared machine does not skew the times.
The CPU run checks qseg against the naive path and torch CE, a run with Liger rows
against Liger: the "target vs" lines, with the targets below.

    python benchmarks/loss_memory.py --device cpu --out benchmarks/results/loss_memory_cpu.json
    python benchmarks/loss_memory.py --device cuda --shapes llama3 qwen2.5 \
        --tokens 4096 8192 16384 32768
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

if not __package__:  # run as `python benchmarks/loss_memory.py`: import from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from benchmarks import common
from qseg.losses import (
    available_losses,
    default_budget,
    fused_linear_loss,
    loss_from_logits,
    loss_kind,
    plan_chunks,
)

SHAPES = {"llama3": (128256, 4096), "qwen2.5": (151936, 3584)}
# torch_linear: torch's own chunked F.linear_cross_entropy (torch >= 2.13), a peer of Liger's.
CE_ONLY_IMPLS = ("torch", "torch_linear", "liger", "cce")
IMPLS = ("torch", "torch_linear", "liger", "cce", "naive", "qseg")
COLUMNS = (
    "impl",
    "loss",
    "tokens",
    "vocab",
    "hidden",
    "dtype",
    "chunk_size",
    "peak_mb",
    "ms",
    "peak_vs_torch_ce",
    "ms_vs_torch_ce",
    "peak_vs_naive",
    "peak_vs_liger",
    "ms_vs_liger",
    "logit_softcap",
    "peak_vs_qseg_ce",
)
# The CPU targets: qseg adds at most 1/4 of naive's peak, in at most 2x torch CE's time.
NAIVE_PEAK_TARGET, TORCH_CE_TIME_TARGET = 0.25, 2.0
# The GPU targets against Liger's fused linear CE: (peak, time) bounds per loss kind;
# a region loss does more work per logit than cross-entropy, so its bounds are wider.
LIGER_BOUNDS = {"token": (1.0, 1.2), "region": (1.5, 1.6)}
# Label smoothing, a soft-cap and the like add no (chunk, V) buffer: at most this much
# more peak memory than qseg's plain cross-entropy.
OPTIONS_PEAK_BOUND = 1.1


# ----------------------------------------------------------------------------- worker


def make_loss(case: dict[str, Any], labels: torch.Tensor) -> Callable[..., torch.Tensor]:
    """The loss of `case["impl"]` as f(hidden, weight) -> 0-dim tensor.

    Args:
        case: the case (`impl`, `loss`, `chunk_size`).
        labels: (B, T) token ids, IGNORE_INDEX where ignored.

    Returns:
        f(hidden (B, T, d), weight (V, d)) -> the mean loss.

    Raises:
        ImportError: the implementation's package is missing.
    """
    impl, loss, chunk = case["impl"], case["loss"], case["chunk_size"]
    flat_labels = labels.view(-1)
    if impl in ("naive", "qseg"):
        loss = common.parse_losses_text(loss)
        options = {"logit_softcap": case["logit_softcap"]} if case.get("logit_softcap") else {}
    if impl == "torch":
        return lambda h, w: F.cross_entropy(F.linear(h, w).float().flatten(0, 1), flat_labels)
    if impl == "torch_linear":
        return lambda h, w: F.linear_cross_entropy(
            h.flatten(0, 1), w, flat_labels, ignore_index=common.IGNORE_INDEX
        )
    if impl == "naive":
        return lambda h, w: loss_from_logits(F.linear(h, w), labels, loss, **options)
    if impl == "qseg":
        return lambda h, w: fused_linear_loss(h, w, labels, loss, chunk_size=chunk, **options)
    if impl == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss(ignore_index=common.IGNORE_INDEX)
        return lambda h, w: liger(w, h.flatten(0, 1), flat_labels)
    if impl == "cce":
        from cut_cross_entropy import linear_cross_entropy

        return lambda h, w: linear_cross_entropy(h, w, labels, ignore_index=common.IGNORE_INDEX)
    raise ValueError(f"unknown impl {impl!r}; allowed: {', '.join(IMPLS)}")


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    """Measure one (impl, loss, shape) case in this process.

    Args:
        case: from `build_cases` (or `autotune.build_cases`).

    Returns:
        The case's row: `peak_mb` and `ms`, or why it was skipped or failed.
    """
    device = torch.device(case["device"])
    dtype = common.parse_dtype(case["dtype"])
    if device.type == "cpu":
        torch.set_num_threads(case["threads"])
    batch, seq_len = case["tokens"] // case["seq_len"], case["seq_len"]
    vocab, dim = case["vocab"], case["hidden"]
    cpu = torch.Generator().manual_seed(case["seed"])
    labels = common.zipf_labels(batch, seq_len, vocab, generator=cpu).to(device)
    # Drawn where they live: a (V, d) weight drawn on the CPU takes seconds at V=128256.
    on_device = torch.Generator(device).manual_seed(case["seed"])
    hidden = torch.randn(batch, seq_len, dim, generator=on_device, device=device, dtype=dtype)
    weight = torch.randn(vocab, dim, generator=on_device, device=device, dtype=dtype)
    weight.mul_(dim**-0.5)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)

    row = {key: case[key] for key in common.ROW_FIELDS if key in case}
    row.update(device=common.device_name(device), batch=batch, seq_len=seq_len, reps=case["reps"])
    if device.type == "cpu":
        row["threads"] = case["threads"]
    row.update(chunk_size=None, valid_tokens=int((labels != common.IGNORE_INDEX).sum()))
    row["logit_softcap"] = case.get("logit_softcap")
    if case["impl"] == "qseg":
        row["chunk_size"] = case["chunk_size"]
        if case["chunk_size"] == "auto":  # the rows fused_linear_loss will pick, and why
            plan = plan_chunks(
                row["valid_tokens"],
                vocab,
                dim,
                dtype,
                common.parse_losses_text(case["loss"]),
                device=device,
                positions=batch * seq_len,
            )
            row.update(
                chunk_size=plan.rows,
                chunk_plan=plan.reason,
                chunk_budget_mb=plan.budget_bytes / common.MiB,
                chunk_bytes_per_row=plan.bytes_per_row,
                # token-wise plans hold their chunks below this, the device's own budget
                device_budget_mb=default_budget(device)[0] / common.MiB,
            )
    try:
        loss_fn = make_loss(case, labels)
    except ImportError as error:
        return {**row, "peak_mb": None, "ms": None, "skipped": f"not installed: {error}"}

    def step() -> None:
        loss_fn(hidden, weight).backward()

    reset = common.clear_grads(hidden, weight)
    try:
        peak, ms = common.measure(step, reset, device, case["reps"])
    except (RuntimeError, torch.OutOfMemoryError) as error:
        if not common.is_oom(error):
            raise
        return {**row, "peak_mb": None, "ms": None, "error": "out of memory"}
    if case.get("profile"):
        reset()
        row["profile"] = common.kernel_profile(step, device)
    return {**row, "peak_mb": peak, "ms": ms}


# ----------------------------------------------------------------------------- driver


def parse_shape(text: str) -> tuple[int, int]:
    """A named head (`llama3`, `qwen2.5`) or `VxD`, to (vocab, hidden).

    Args:
        text: as given to `--shapes`.

    Returns:
        (V, d).

    Raises:
        ValueError: neither a named head nor `VxD` with positive numbers.
    """
    if text in SHAPES:
        return SHAPES[text]
    vocab, sep, dim = text.partition("x")
    if not (sep and vocab.isdigit() and dim.isdigit() and int(vocab) > 0 and int(dim) > 0):
        raise ValueError(
            f"shape {text!r} is neither VxD (e.g. 32000x256) nor one of {list(SHAPES)}"
        )
    return int(vocab), int(dim)


def shape_arg(text: str) -> str:
    """`--shapes`: a shape `parse_shape` reads, kept as written (rows name it so).

    Args:
        text: the flag's value.

    Returns:
        `text`, checked.
    """
    try:
        parse_shape(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def parse_chunk(text: str) -> int | str:
    """`--chunk-size`: a positive number of rows, or "auto".

    Args:
        text: the flag's value.

    Returns:
        The number of rows, or "auto".
    """
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(
            f"chunk size must be a positive integer or auto; got {text!r}"
        )
    return int(text)


def defaults(device: torch.device, quick: bool) -> dict[str, Any]:
    """The flags' defaults by device: on a CPU the CPU targets' case, on CUDA the Llama-3
    head at 8k tokens; `--quick` tiny shapes.

    Args:
        device: where the cases run.
        quick: `--quick`.

    Returns:
        Flag name -> default value.
    """
    if quick:
        return dict(
            tokens=[256], shapes=["1024x64"], seq_len=128, dtype="float32", chunk_size=64, reps=1
        )
    if device.type == "cpu":
        return dict(
            tokens=[2048],
            shapes=["32000x256"],
            seq_len=512,
            dtype="float32",
            chunk_size=256,
            reps=5,
        )
    return dict(
        tokens=[8192], shapes=["llama3"], seq_len=4096, dtype="bfloat16", chunk_size="auto", reps=10
    )


def base_case(
    args: argparse.Namespace, device: torch.device, shape: str, tokens: int
) -> dict[str, Any]:
    """The fields every case of one shape and token count shares (also for autotune.py).

    Args:
        args: the parsed flags (seq_len, dtype, reps, seed, threads).
        device: where the cases run.
        shape: a `--shapes` value.
        tokens: tokens per batch (B*T).

    Returns:
        The shared fields.

    Raises:
        ValueError: `tokens` is not a multiple of the sequence length.
    """
    vocab, dim = parse_shape(shape)
    seq_len = min(args.seq_len, tokens)
    if tokens % seq_len:
        raise ValueError(f"--tokens {tokens} is not a multiple of --seq-len {seq_len}")
    return dict(
        tokens=tokens,
        seq_len=seq_len,
        vocab=vocab,
        hidden=dim,
        dtype=common.dtype_name(common.parse_dtype(args.dtype)),
        device=str(device),
        reps=args.reps,
        seed=args.seed,
        threads=args.threads,
    )


def build_cases(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """Every (shape, tokens, impl, loss) case; torch, Liger and CCE run cross-entropy only.

    Args:
        args: the parsed flags.
        device: where the cases run.

    Returns:
        The cases, as `run_case` reads them.
    """
    cases = []
    for shape in args.shapes:
        for tokens in args.tokens:
            base = dict(base_case(args, device, shape, tokens), chunk_size=args.chunk_size)
            if args.profile:
                base["profile"] = True
            for impl in args.impls:
                losses = ["cross_entropy"] if impl in CE_ONLY_IMPLS else args.losses
                cases += [dict(base, impl=impl, loss=loss) for loss in losses]
                if args.logit_softcap and impl not in CE_ONLY_IMPLS:
                    capped = dict(base, impl=impl, logit_softcap=args.logit_softcap)
                    cases += [dict(capped, loss=loss) for loss in losses]
    return cases


def run_all(
    cases: list[dict[str, Any]],
    device: torch.device,
    isolate: bool,
    timeout: float,
    out: Path | None = None,
) -> list[dict]:
    """Measure every case (skipping what cannot run here); rows so far are kept in `out`.

    Args:
        cases: from `build_cases`.
        device: where they run.
        isolate: run each in a fresh process (`common.run_isolated`).
        timeout: seconds per isolated case.
        out: where to write the rows after every case; None writes nothing.

    Returns:
        One row per case, in order.
    """
    rows = []
    for case in cases:
        if case["impl"] in ("liger", "cce") and device.type != "cuda":
            row = common.skipped_row(case, "needs a CUDA device (Triton kernels)")
            row["device"] = common.device_name(device)
        elif case["impl"] == "torch_linear" and not hasattr(F, "linear_cross_entropy"):
            reason = f"torch {torch.__version__} has no F.linear_cross_entropy (new in 2.13)"
            row = common.skipped_row(case, reason)
            row["device"] = common.device_name(device)
        elif isolate:
            row = common.run_isolated("benchmarks.loss_memory", case, timeout)
            row["device"] = common.device_name(device)  # error rows copy the case's "cuda"
        else:
            try:
                row = run_case(case)
            except Exception as error:  # noqa: BLE001 - one failing impl must not cost the rest
                traceback.print_exc()
                row = common.error_row(case, f"{type(error).__name__}: {error}")
                row["device"] = common.device_name(device)
            torch.cuda.empty_cache()
        rows.append(row)
        print(_progress(row), flush=True)
        if out is not None:
            common.write_json(rows, out, quiet=True)
    return rows


def _progress(row: dict[str, Any]) -> str:
    what = f"{row['impl']:>6} {row['loss']:<20} {row['tokens']} x {row['vocab']}x{row['hidden']}"
    if not common.measured(row):
        return f"{what}: {row.get('skipped') or row.get('error')}"
    return f"{what}: {row['peak_mb']:.1f} MiB, {row['ms']:.1f} ms"


def profile_text(row: dict[str, Any]) -> str:
    """A profiled row's kernels, largest first, against its median wall time.

    Args:
        row: a row with a `profile` (`--profile`).

    Returns:
        The lines to print.
    """
    profile = row["profile"]
    what = ("operators", "CPU time") if row["device"] == "cpu" else ("kernels", "device time")
    lines = [
        f"\n--- {row['impl']} {row['loss']}: {profile['launches']} {what[0]}, "
        f"{profile['device_ms']:.1f} ms of {what[1]} in one call; median wall {row['ms']:.1f} ms"
    ]
    lines += [f"{k['ms']:9.2f} ms {k['calls']:5d}x  {k['name']}" for k in profile["top"]]
    return "\n".join(lines)


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Ratio columns against torch CE, the same loss's naive row, and Liger, per shape.

    Args:
        rows: measured rows; changed in place.
    """

    def key(row: dict) -> tuple:
        return row["tokens"], row["vocab"], row["hidden"], row["dtype"]

    found = {
        (key(r), r["impl"], r["loss"], r.get("logit_softcap")): r
        for r in rows
        if common.measured(r)
    }
    for row in rows:
        if not common.measured(row):
            continue
        cap = row.get("logit_softcap")
        plain_ce = row["loss"] == "cross_entropy" and not cap
        if row["impl"] == "qseg" and not plain_ce:
            ref = found.get((key(row), "qseg", "cross_entropy", None))
            if ref is not None and ref["peak_mb"] > 0:
                row["peak_vs_qseg_ce"] = row["peak_mb"] / ref["peak_mb"]
        for name, impl, loss, ref_cap in (
            ("torch_ce", "torch", "cross_entropy", None),
            ("naive", "naive", row["loss"], cap),
            ("liger", "liger", "cross_entropy", None),
        ):
            ref = found.get((key(row), impl, loss, ref_cap))
            if ref is None or ref is row or (name == "naive" and row["impl"] != "qseg"):
                continue
            row[f"peak_vs_{name}"] = row["peak_mb"] / ref["peak_mb"] if ref["peak_mb"] > 0 else None
            if name != "naive":
                row[f"ms_vs_{name}"] = row["ms"] / ref["ms"]


def check_criteria(rows: list[dict[str, Any]]) -> list[str]:
    """Mark qseg rows with the targets they meet or miss (`issue2_pass` against naive and
    torch CE on a CPU, `issue5_pass` against Liger).

    Args:
        rows: with ratio columns (`add_ratios`); changed in place.

    Returns:
        The "target vs" lines to print.
    """
    lines = []
    for row in rows:
        if row["impl"] != "qseg" or not common.measured(row):
            continue
        shape = f"{row['tokens']} tokens, V {row['vocab']}, d {row['hidden']}, {row['dtype']}"
        if "peak_vs_qseg_ce" in row and (row.get("logit_softcap") or ":" in row["loss"]):
            ok = row["peak_vs_qseg_ce"] <= OPTIONS_PEAK_BOUND
            row["options_pass"] = ok
            cap = f", logit_softcap {row['logit_softcap']}" if row.get("logit_softcap") else ""
            lines.append(
                f"target vs qseg CE [{shape}] {row['loss']}{cap}: peak "
                f"{row['peak_vs_qseg_ce']:.3f}x (<= {OPTIONS_PEAK_BOUND}): "
                f"{'PASS' if ok else 'FAIL'}"
            )
        if row["device"] == "cpu" and "peak_vs_naive" in row and "ms_vs_torch_ce" in row:
            ok = (
                row["peak_vs_naive"] <= NAIVE_PEAK_TARGET
                and row["ms_vs_torch_ce"] <= TORCH_CE_TIME_TARGET
            )
            row["issue2_pass"] = ok
            lines.append(
                f"target vs naive [{shape}] {row['loss']}: peak {row['peak_vs_naive']:.3f}x naive "
                f"(<= {NAIVE_PEAK_TARGET}), time {row['ms_vs_torch_ce']:.2f}x torch CE "
                f"(<= {TORCH_CE_TIME_TARGET}): {'PASS' if ok else 'FAIL'}"
            )
        if "peak_vs_liger" in row:
            mixture = common.parse_losses_text(row["loss"])
            kind = "region" if any(loss_kind(n) == "region" for n in mixture) else "token"
            peak_bound, time_bound = LIGER_BOUNDS[kind]
            ok = row["peak_vs_liger"] <= peak_bound and row["ms_vs_liger"] <= time_bound
            row["issue5_pass"] = ok
            lines.append(
                f"target vs Liger [{shape}, {row['device']}] {row['loss']} ({kind}): peak "
                f"{row['peak_vs_liger']:.2f}x Liger (<= {peak_bound}), time "
                f"{row['ms_vs_liger']:.2f}x (<= {time_bound}): {'PASS' if ok else 'FAIL'}"
            )
    return lines


def main(argv: list[str] | None = None) -> None:
    """The command line: measure the cases, print the table and verdicts, write the rows.

    Args:
        argv: the arguments; None reads `sys.argv`.
    """
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common.add_output_args(parser)
    parser.add_argument(
        "--shapes", nargs="+", type=shape_arg, help=f"heads: VxD or {', '.join(SHAPES)}"
    )
    parser.add_argument(
        "--tokens", nargs="+", type=common.positive_int, help="tokens per batch (B*T)"
    )
    parser.add_argument("--seq-len", type=common.positive_int, help="T; the batch is tokens / T")
    parser.add_argument("--dtype", choices=list(common.DTYPES))
    parser.add_argument("--chunk-size", type=parse_chunk, help="qseg rows per chunk, or auto")
    parser.add_argument("--reps", type=common.positive_int, help="timed calls per case (median)")
    parser.add_argument(
        "--losses", nargs="+", type=common.losses_arg, default=available_losses(), metavar="LOSS"
    )
    parser.add_argument(
        "--logit-softcap",
        type=common.positive_float,
        help="also measure naive and qseg with logits soft-capped at this value",
    )
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after measuring, profile one more call of each case: its largest kernels "
        "(CPU: operators) and their total device time, in the row's `profile`",
    )
    parser.add_argument(
        "--threads",
        type=common.positive_int,
        default=1,
        help="CPU threads per case (default 1: on a shared machine, more threads "
        "make times depend on other load)",
    )
    parser.add_argument(
        "--isolate",
        action="store_true",
        help="a fresh process per case on CUDA too (always on CPU)",
    )
    parser.add_argument(
        "--timeout", type=common.positive_float, default=600, help="seconds per isolated case"
    )
    args = parser.parse_args(argv)

    if args.case:
        common.emit_row(run_case(json.loads(args.case)))
        return
    device = common.resolve_device(args.device)
    for name, value in defaults(device, args.quick).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    common.check_out_path(args.out, args.overwrite)
    cases = build_cases(args, device)
    rows = run_all(cases, device, args.isolate or device.type == "cpu", args.timeout, args.out)
    add_ratios(rows)
    verdicts = check_criteria(rows)
    print(f"\ndevice: {rows[0]['device'] if rows else device}; torch {torch.__version__}\n")
    print(common.markdown_table(rows, COLUMNS))
    if verdicts and args.quick:
        verdicts.insert(0, "(--quick: shapes too small for these targets to mean anything)")
    print("\n".join(["", *verdicts]) if verdicts else "")
    for row in rows:
        if "profile" in row:
            print(profile_text(row))
    if args.out:
        common.write_json(rows, args.out)
    # Running out of memory is a result; a crashed case is a failure of the benchmark.
    if any(row.get("error", "out of memory") != "out of memory" for row in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
