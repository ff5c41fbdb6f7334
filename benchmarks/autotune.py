"""Chunk-size sweep of the fused losses: time and memory per size, and the auto-tuner's pick.

For each shape and loss, `qseg.losses.fused_linear_loss` runs forward+backward at chunk
sizes from `--sizes` (default: powers of two from 64 rows to the token count) and at
`chunk_size="auto"`, whose rows are `qseg.losses.plan_chunks(...)`'s pick. Each case is
measured like `benchmarks.loss_memory` (same worker, fresh process per case on CPU).

Memory grows linearly with the chunk: peak(rows) = fixed + slope · rows. A least-squares
line through the sweep separates the two, so each size's `transient_mb` (peak − fixed)
can be set against the tuner's budget and its estimate, and `bytes_per_logit`
(slope / V) against the tuner's `bytes_per_row / V`. The pick should be within 10% of the
fastest size whose transient fits the budget (`within_10pct`). A token-wise plan holds its
budget below the device's, to keep level with fused cross-entropy kernels' memory; what
that costs in time is reported too (`fastest_in_device_budget`, `ms_vs_device_fastest`).

    python benchmarks/autotune.py --device cpu --out benchmarks/results/autotune_cpu.json
    python benchmarks/autotune.py --device cuda --out benchmarks/results/gpu/autotune_gpu.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

if not __package__:  # run as `python benchmarks/autotune.py`: import from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks import common, loss_memory

WITHIN = 1.10
COLUMNS = (
    "loss",
    "tokens",
    "vocab",
    "hidden",
    "dtype",
    "chunk_size",
    "pick",
    "peak_mb",
    "ms",
    "transient_mb",
    "estimated_mb",
    "budget_mb",
    "fits_budget",
    "ms_vs_torch_ce",
    "within_10pct",
)


def defaults(device: torch.device, quick: bool) -> dict[str, Any]:
    """The flags' defaults by device (`--quick`: tiny shapes).

    Args:
        device: where the cases run.
        quick: `--quick`.

    Returns:
        Flag name -> default value.
    """
    if quick:
        return dict(shapes=["1024x64"], tokens=256, seq_len=128, dtype="float32", reps=1)
    if device.type == "cpu":
        # the CPU targets' head and SmolLM2's (V 49152, d 576)
        return dict(
            shapes=["32000x256", "49152x576"], tokens=2048, seq_len=512, dtype="float32", reps=3
        )
    return dict(shapes=["llama3", "qwen2.5"], tokens=8192, seq_len=4096, dtype="bfloat16", reps=5)


def build_cases(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """The sweep's cases: per shape a torch CE row, and per loss every chunk size and "auto".

    Args:
        args: the parsed flags.
        device: where the cases run.

    Returns:
        The cases, as `loss_memory.run_case` reads them.
    """
    sizes = args.sizes or [2**k for k in range(6, 20) if 2**k <= args.tokens]
    cases = []
    for shape in args.shapes:
        base = loss_memory.base_case(args, device, shape, args.tokens)
        cases.append(dict(base, impl="torch", loss="cross_entropy", chunk_size=None))
        for loss in args.losses:
            cases += [
                dict(base, impl="qseg", loss=loss, chunk_size=size) for size in (*sizes, "auto")
            ]
    return cases


def _fit_line(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """Least-squares (intercept, slope) through (x, y) points; None with fewer than 2 x's."""
    xs = [x for x, _ in points]
    if len(set(xs)) < 2:
        return None
    mean_x, mean_y = sum(xs) / len(xs), sum(y for _, y in points) / len(points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x in xs)
    return mean_y - slope * mean_x, slope


def _sweeps(rows: list[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    """The measured qseg rows per (tokens, vocab, hidden, dtype, loss)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["impl"] == "qseg" and common.measured(row):
            key = (row["tokens"], row["vocab"], row["hidden"], row["dtype"], row["loss"])
            groups.setdefault(key, []).append(row)
    return groups


def analyse(rows: list[dict[str, Any]]) -> list[str]:
    """Add transient, estimate and fit columns to the sweep's rows and judge each pick.

    Args:
        rows: measured rows (`loss_memory.run_all`); changed in place.

    Returns:
        The lines to print, one per (shape, loss) whose pick could be judged.
    """
    lines = []
    for (tokens, vocab, dim, dtype, loss), group in _sweeps(rows).items():
        picks = [r for r in group if r.get("chunk_budget_mb") is not None]
        if not picks:
            continue
        pick = picks[0]
        sweep = [r for r in group if r is not pick]
        for r in group:
            r["pick"] = r is pick
            r["budget_mb"] = pick["chunk_budget_mb"]
            rows_eff = min(r["chunk_size"], r["valid_tokens"])
            r["estimated_mb"] = rows_eff * pick["chunk_bytes_per_row"] / common.MiB
        fit = _fit_line([(min(r["chunk_size"], r["valid_tokens"]), r["peak_mb"]) for r in sweep])
        if fit is None:
            continue
        fixed, slope = fit
        for r in group:
            r["transient_mb"] = r["peak_mb"] - fixed
            r["fits_budget"] = r["transient_mb"] <= r["budget_mb"]
            r["bytes_per_logit"] = slope * common.MiB / vocab
            r["estimated_bytes_per_logit"] = pick["chunk_bytes_per_row"] / vocab
        fitting = [r for r in group if r["fits_budget"]]
        if not fitting:
            continue
        fastest = min(fitting, key=lambda r: r["ms"])
        pick.update(
            fastest_chunk=fastest["chunk_size"],
            fastest_ms=fastest["ms"],
            within_10pct=pick["ms"] <= WITHIN * fastest["ms"],
        )
        line = (
            f"[{tokens} tokens, V {vocab}, d {dim}, {dtype}] {loss}: "
            f"pick {pick['chunk_size']} rows ({pick['ms']:.1f} ms, transient "
            f"{pick['transient_mb']:.0f} of {pick['budget_mb']:.0f} MiB budget); "
            f"fastest fitting {fastest['chunk_size']} rows ({fastest['ms']:.1f} ms): "
            f"pick within 10% of it: {'yes' if pick['within_10pct'] else 'no'}; measured "
            f"{pick['bytes_per_logit']:.1f} bytes/logit, "
            f"tuner's estimate {pick['estimated_bytes_per_logit']:.1f}"
        )
        lines.append(line + _cost_of_a_held_budget(pick, group))
    return lines


def _cost_of_a_held_budget(pick: dict[str, Any], group: list[dict[str, Any]]) -> str:
    """A token-wise plan holds its budget below the device's (to Liger's memory): what
    the fastest size within the device's whole budget would have saved. Adds its columns."""
    device_budget = pick.get("device_budget_mb")
    if device_budget is None or device_budget <= pick["budget_mb"]:
        return ""
    fitting = [r for r in group if r["transient_mb"] <= device_budget]
    fastest = min(fitting, key=lambda r: r["ms"], default=pick)
    pick.update(
        fastest_in_device_budget=fastest["chunk_size"],
        ms_vs_device_fastest=pick["ms"] / fastest["ms"],
    )
    return (
        f"; within the device's whole {device_budget:.0f} MiB budget the fastest is "
        f"{fastest['chunk_size']} rows ({fastest['ms']:.1f} ms, the pick takes "
        f"{pick['ms_vs_device_fastest']:.2f}x)"
    )


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """One panel per (shape, loss): time and peak memory against rows per chunk.

    Args:
        rows: after `analyse`.
        path: the PNG to write.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _sweeps(rows)
    if not groups:
        return
    fig, axes = plt.subplots(len(groups), 1, figsize=(7, 3.2 * len(groups)), squeeze=False)
    for ax, ((tokens, vocab, dim, dtype, loss), group) in zip(
        axes[:, 0], groups.items(), strict=True
    ):
        sweep = sorted((r for r in group if not r.get("pick")), key=lambda r: r["chunk_size"])
        xs = [r["chunk_size"] for r in sweep]
        ax.plot(xs, [r["ms"] for r in sweep], "o-", color="tab:blue", label="time (ms)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rows per chunk")
        ax.set_ylabel("ms (median fwd+bwd)", color="tab:blue")
        mem = ax.twinx()
        mem.plot(xs, [r["peak_mb"] for r in sweep], "s--", color="tab:red", label="peak (MiB)")
        mem.set_ylabel("peak added MiB", color="tab:red")
        budget = ""
        for pick in (r for r in group if r.get("pick")):
            ax.axvline(pick["chunk_size"], color="gray", linestyle=":")
            ax.plot(
                [pick["chunk_size"]],
                [pick["ms"]],
                "*",
                color="black",
                markersize=14,
                label="auto pick",
            )
            budget = f", chunk budget {pick['budget_mb']:.0f} MiB"
        ax.set_title(  # two lines: one would be cut off at the figure's edge
            f"{loss}{budget}\n{tokens} tokens, V {vocab}, d {dim}, {dtype} ({group[0]['device']})",
            fontsize=9,
        )
        handles = ax.get_legend_handles_labels()[0] + mem.get_legend_handles_labels()[0]
        ax.legend(handles=handles, fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


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
        "--shapes",
        nargs="+",
        type=loss_memory.shape_arg,
        help=f"heads: VxD or {', '.join(loss_memory.SHAPES)}",
    )
    parser.add_argument("--tokens", type=common.positive_int)
    parser.add_argument("--seq-len", type=common.positive_int)
    parser.add_argument("--dtype", choices=list(common.DTYPES))
    parser.add_argument(
        "--sizes", nargs="+", type=common.positive_int, help="rows per chunk to sweep"
    )
    parser.add_argument(
        "--losses",
        nargs="+",
        type=common.loss_arg,
        default=["cross_entropy", "generalized_dice", "lovasz"],
        metavar="LOSS",
    )
    parser.add_argument("--reps", type=common.positive_int)
    parser.add_argument(
        "--threads", type=common.positive_int, default=1, help="CPU threads per case"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", type=Path, help="PNG path (default: --out with .png)")
    parser.add_argument(
        "--isolate", action="store_true", help="a fresh process per case on CUDA too"
    )
    parser.add_argument("--timeout", type=common.positive_float, default=600)
    args = parser.parse_args(argv)

    device = common.resolve_device(args.device)
    for name, value in defaults(device, args.quick).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    plot_path = args.plot or (args.out.with_suffix(".png") if args.out else None)
    common.check_out_path(args.out, args.overwrite)
    common.check_out_path(plot_path, args.overwrite)
    isolate = args.isolate or device.type == "cpu"
    rows = loss_memory.run_all(build_cases(args, device), device, isolate, args.timeout, args.out)
    loss_memory.add_ratios(rows)
    verdicts = analyse(rows)
    print(f"\ndevice: {rows[0]['device']}; torch {torch.__version__}\n")
    print(common.markdown_table(rows, COLUMNS))
    print("\n".join(["", *verdicts]))
    if args.out:
        common.write_json(rows, args.out)
    if plot_path is not None:
        plot(rows, plot_path)
    if any(row.get("error", "out of memory") != "out of memory" for row in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
