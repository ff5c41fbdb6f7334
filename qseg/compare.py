"""Side-by-side results of several runs: ``qseg compare``.

Each input is a run dir (its ``run.json`` holds the eval summary when trained with
``qseg train --eval-samples N``) or a report file written by ``qseg eval --output``
(which also scores a base model alone, the baseline). The output is a markdown table,
printed and saved, and a grouped bar chart of the metrics, one bar per run, labelled
by the run's loss mix::

    | run   | loss                                      | dataset | n | exact_match | ...
    | ce    | cross_entropy:1                           | gsm8k   | 5 | 0.200       | ...
    | gdice | cross_entropy:0.6,generalized_dice:0.4    | gsm8k   | 5 | **0.400**   | ...
"""

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from qseg.data import is_one_file
from qseg.loss_text import format_losses
from qseg.metrics import CHOICE_METRICS, LOWER_IS_BETTER, MATH_METRICS
from qseg.run_files import RUN_FILE, read_run
from qseg.text_metrics import TEXT_METRICS

TABLE_FILE = "compare.md"
CHART_FILE = "compare.png"
BASELINE_LABEL = "base model (no adapter)"
METRICS = (*MATH_METRICS, *CHOICE_METRICS, *(m for m in TEXT_METRICS if m not in MATH_METRICS))


@dataclass
class RunResult:
    """The eval summary of one run (or report) and what to call it."""

    name: str  # the run dir's or report file's name
    label: str  # the losses, e.g. "cross_entropy:0.6,generalized_dice:0.4"
    summary: dict[str, Any]  # dataset, n and the metrics of qseg.metrics
    scored: str | None = None  # the data scored: "<dataset source> <split>", if known


def loss_label(losses: str | Mapping[str, Any] | None) -> str:
    """The run's losses in their text form, or "unknown loss" when the run does not say."""
    return "unknown loss" if losses is None else format_losses(losses)


def load_result(path: str | Path) -> RunResult:
    """The eval summary of a run dir or report (`_load_result`), its figures checked.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: not a qseg run or report, a run without eval results, or a metric
            that is not a number.
    """
    result = _load_result(path)
    for name in (*METRICS, "n"):
        value = result.summary.get(name)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if value is not None and not (number and math.isfinite(value)):
            raise ValueError(
                f"{path}: {name} is {value!r}, not a number; the file was edited or is not "
                "a qseg report: run qseg eval again"
            )
    return result


def _load_result(path: str | Path) -> RunResult:
    """The eval summary of a run dir (or its run.json) or of a ``qseg eval`` report file.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: not a qseg run or report, or a run without eval results (the message
            says how to get them).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist; give qseg run folders or `qseg eval --output` files"
        )
    if path.is_file() and path.name != RUN_FILE:
        return _load_report(path)
    run_dir = _run_dir(path)
    run = read_run(run_dir)
    if not isinstance(run.get("eval"), dict) or not run["eval"]:
        raise ValueError(
            f"run {run_dir} has no eval results in its {RUN_FILE}; train with "
            f"`qseg train --eval-samples N`, or run `qseg eval --adapter {run_dir} --output "
            f"{run_dir.name}-eval.json` and pass that report file to qseg compare instead"
        )
    loss = run.get("loss") or run["config"].get("loss")
    scored = _scored(run["config"].get("dataset"), run["config"].get("eval_split"))
    return RunResult(run_dir.name, loss_label(loss), run["eval"], scored)


def _run_dir(path: Path) -> Path:
    """A run dir given as itself or as its run.json."""
    return path.parent if path.name == RUN_FILE else path


def _load_report(path: Path) -> RunResult:
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not a qseg eval report (invalid JSON: {error})") from error
    if not isinstance(report, dict) or not isinstance(report.get("summary"), dict):
        raise ValueError(
            f"{path} is not a qseg eval report (no 'summary'); give run dirs or files "
            "written by `qseg eval --output`"
        )
    setup = report.get("setup")
    if setup is None:
        # `qseg train` saves its report, without a setup, as eval.json beside run.json.
        if (path.parent / RUN_FILE).is_file():
            return load_result(path.parent)
        return RunResult(path.stem, "unknown loss", report["summary"])
    label = loss_label(setup.get("loss")) if setup.get("adapter") else BASELINE_LABEL
    scored = _scored(setup.get("dataset"), setup.get("split"))
    return RunResult(path.stem, label, report["summary"], scored)


def _scored(dataset: str | None, split: str | None) -> str | None:
    if dataset is None:
        return None
    return dataset if is_one_file(dataset) else f"{dataset} {split}"


def legend_labels(results: Sequence[RunResult]) -> list[str]:
    """Loss labels, with the run name appended where two runs share a loss mix."""
    labels = [result.label for result in results]
    return [
        f"{label} ({result.name})" if labels.count(label) > 1 else label
        for label, result in zip(labels, results, strict=True)
    ]


def _metric_names(results: Sequence[RunResult]) -> list[str]:
    return [name for name in METRICS if any(r.summary.get(name) is not None for r in results)]


def markdown_table(results: Sequence[RunResult]) -> str:
    """A markdown table, one row per run. Among the runs scored on the same dataset, the
    best value of each metric is in bold (lower is better for the error shares), unless
    all of them are equal."""
    metrics = _metric_names(results)
    # (dataset, metric) -> the values the runs on that dataset reached
    values: dict[tuple[str, str], list[float]] = {}
    for result in results:
        for name in metrics:
            if result.summary.get(name) is not None:
                key = (str(result.summary.get("dataset")), name)
                values.setdefault(key, []).append(result.summary[name])

    header = ["run", "loss", "dataset", "n", *metrics]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * 3 + "---:|" * (1 + len(metrics)),
    ]
    for result in results:
        dataset = str(result.summary.get("dataset"))
        cells = [result.name, result.label, dataset, str(result.summary.get("n", "?"))]
        for name in metrics:
            value = result.summary.get(name)
            if value is None:
                cells.append("n/a")
                continue
            reached = values[dataset, name]
            best = min(reached) if name in LOWER_IS_BETTER else max(reached)
            bold = value == best and len(set(reached)) > 1
            cells.append(f"**{value:.3f}**" if bold else f"{value:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    lower = ", ".join(name for name in metrics if name in LOWER_IS_BETTER)
    note = f"Best per dataset in bold; lower is better for {lower}." if lower else ""
    return "\n".join(lines) + ("\n\n" + note if note else "") + "\n"


def plot_metrics(results: Sequence[RunResult], path: str | Path) -> None:
    """Save a grouped bar chart PNG: one group per metric, one bar per run."""
    metrics = _metric_names(results)
    width = 0.8 / len(results)
    figure = Figure(figsize=(max(8.0, 1.1 * len(metrics) + 5), 5), layout="constrained")
    axes = figure.add_subplot()
    for index, (result, label) in enumerate(zip(results, legend_labels(results), strict=True)):
        # A metric the run lacks is NaN: no bar, rather than a bar at 0 that reads as a score.
        values = [result.summary.get(name) for name in metrics]
        heights = [math.nan if value is None else value for value in values]
        positions = [m + (index - (len(results) - 1) / 2) * width for m in range(len(metrics))]
        axes.bar(positions, heights, width, label=label)
    ticks = [f"{name} (lower is better)" if name in LOWER_IS_BETTER else name for name in metrics]
    axes.set_xticks(range(len(metrics)), ticks, rotation=30, ha="right")
    axes.set_ylim(0, 1)
    axes.set_ylabel("score (share of examples or steps)")
    datasets = sorted({str(r.summary.get("dataset")) for r in results})
    axes.set_title(f"qseg compare: {', '.join(datasets)}")
    figure.legend(loc="outside right upper", fontsize="small")
    figure.savefig(path, dpi=120)


def _distinct(runs: Sequence[str]) -> list[str]:
    """``runs`` without repeats of one run (given twice, or as its dir and its run.json)."""
    seen: dict[Path, str] = {}
    for run in runs:
        key = _run_dir(Path(run).expanduser().resolve())
        if key in seen:
            print(f"warning: {run} is {seen[key]} again; it is shown once", file=sys.stderr)
        else:
            seen[key] = run
    return list(seen.values())


def run_compare(args: argparse.Namespace) -> int:
    """``qseg compare``: print the table, save it and the chart.

    Args:
        args: the parsed ``qseg compare`` arguments (see ``qseg.cli.add_compare_arguments``).

    Returns:
        0.

    Raises:
        ValueError: a run without eval results (all such runs are named), or outputs that
            exist without ``--overwrite``.
        FileNotFoundError: a run dir or report that does not exist.
    """
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"--output-dir {output_dir} is a file; choose a folder")
    table_path, chart_path = output_dir / TABLE_FILE, output_dir / CHART_FILE
    existing = [str(p) for p in (table_path, chart_path) if p.exists()]
    if existing and not args.overwrite:
        raise ValueError(
            f"{' and '.join(existing)} already there; pass --overwrite to replace, or choose "
            "another --output-dir"
        )
    results, problems = [], []
    for run in _distinct(args.runs):
        try:
            results.append(load_result(run))
        except ValueError as error:
            problems.append(str(error))
    if problems:
        raise ValueError("cannot compare:\n  " + "\n  ".join(problems))

    sizes = {result.name: result.summary.get("n") for result in results}
    if len(set(sizes.values())) > 1:
        print(
            "warning: the results come from different numbers of examples ("
            + ", ".join(f"{name}: {n}" for name, n in sizes.items())
            + "), so their scores differ by chance too; score each with the same "
            "`qseg eval --limit N --output FILE` and compare those files",
            file=sys.stderr,
        )
    scored = {result.name: result.scored for result in results if result.scored is not None}
    if len(set(scored.values())) > 1:
        print(
            "warning: the results score different data ("
            + ", ".join(f"{name}: {data}" for name, data in scored.items())
            + "); compare reports of `qseg eval --dataset D --split S` on the same D and S",
            file=sys.stderr,
        )
    table = markdown_table(results)
    print(table)
    output_dir.mkdir(parents=True, exist_ok=True)
    table_path.write_text(table)
    plot_metrics(results, chart_path)
    print(f"table written to {table_path}, chart to {chart_path}")
    return 0
