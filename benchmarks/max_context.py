"""The longest sequence QLoRA trains one optimizer step at, per memory cap and loss mixture.

Each trial builds a 4-bit QLoRA model of a real architecture (Llama-3.1-8B or Qwen2.5-7B
shapes, random weights, nothing downloaded) in a fresh process under a CUDA memory cap
and trains one step at one length, with `qseg` (hidden states -> fused loss on the head)
or `naive` (full logits -> the loss): `benchmarks/context_trial.py` says how.

Search: per (mixture, impl, cap), the longest length (a multiple of `--granularity`) that
trains, to within `--resolution`; each trial's peak predicts the next probe
(`benchmarks/context_search.py`). Searches take turns; with `--time-budget` no trial
starts after it, and rows report the bracket they have (`converged` false). Up to
`--jobs` trials share the card, as long as their caps fit on it together. `unsloth` (if
asked for) gives a skipped row: it builds models from pretrained checkpoints only.
Mixtures are written as on `qseg train --loss`: `cross_entropy:0.6,lovasz:0.4`.

Rows: `tokens` is the longest length that trained, `oom_tokens` the shortest that ran
out of memory (None: none did), `timeout_tokens` the shortest whose trial ran past
`--trial-timeout` (it bounds the search too, and the row is then not `converged`),
`peak_mb` the memory the step added at `measured_tokens` (the cap's own longest fitting
trial) and `total_peak_mb` the whole process's peak then; `vs_naive` and `vs_ce` divide
`tokens` by naive's (same mixture) and by cross-entropy's. `ms` is that one step's wall
time, first-call warm-up (torch.compile, cuBLAS) and concurrent trials on the card
included: a sign of cost, not a speed comparison (`benchmarks.loss_memory` compares speed).

`--resume FILE` seeds the brackets with an earlier run's rows (same card, model, layers
and granularity), so a search cut short by `--time-budget` goes on where it stopped: with
device time scarce, two short calls add up to one long one. The earlier rows of searches
this run does not make (other caps, mixtures or impls) are kept in its output as they
were (failed ones are not). `--resume-if-same-card` sets aside, instead of refusing, a
file searched on another card, so scripts can resume committed results on whatever card.

On CPU there is no cap to search: `--device cpu` runs one trial per (mixture, impl) at
`--tokens` and reports its memory and time, so the path is exercised without a GPU.

    python benchmarks/max_context.py --device cuda --caps 16 24 --out max_context.json
    python benchmarks/max_context.py --device cuda --caps 16 24 --resume max_context.json \
        --out max_context.json --overwrite
    python benchmarks/max_context.py --device cpu --quick
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

if not __package__:  # run as `python benchmarks/max_context.py`: import from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks import common
from benchmarks.context_search import Search, Searcher, earlier_rows, search_row
from benchmarks.context_trial import MODELS, WEIGHTS, GiB, run_trial, trial_case

MODULE = "benchmarks.max_context"  # the trials' worker: this module with --case
MIXES = ("cross_entropy", "lovasz", "cross_entropy:0.6,generalized_dice:0.4")
IMPLS = ("qseg", "naive", "unsloth")
COLUMNS = (
    "model",
    "layers",
    "impl",
    "loss",
    "cap_gb",
    "tokens",
    "oom_tokens",
    "converged",
    "trials",
    "peak_mb",
    "total_peak_mb",
    "ms",
    "vs_naive",
    "vs_ce",
)
# Memory a concurrent trial holds outside its cap (CUDA context, cuBLAS, bitsandbytes).
TRIAL_OVERHEAD_GB = 1.5


def search_all(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """Run every search on the card; after each trial the rows so far are kept in `args.out`.

    Args:
        args: the parsed flags.
        device: the CUDA device to search on.

    Returns:
        One row per search (`context_search.search_row`), then the `--resume` file's rows
        of searches this run does not make.
    """
    searches = [
        Search(model, loss, impl, cap)
        for model in args.models
        for loss in args.mixes
        for impl in args.impls
        if impl != "unsloth"
        for cap in sorted(args.caps)
    ]
    searcher = Searcher(
        args.granularity, args.max_tokens, args.start_tokens, searches, args.resolution
    )
    # The earlier rows of searches not run now are kept, so the output is a superset.
    kept = []
    if args.resume is not None:
        earlier = earlier_rows(args, device)
        searcher.resume(earlier)
        now = {(s.model, s.loss, s.impl, s.cap_gb) for s in searches}
        kept = [
            r
            for r in earlier
            if r.get("cap_gb") is not None
            and not r.get("error")  # an old failure must not fail every later run
            and (r.get("model"), r.get("loss"), r.get("impl"), r["cap_gb"]) not in now
        ]
    card_gb = torch.cuda.get_device_properties(device).total_memory / GiB
    deadline = time.monotonic() + args.time_budget
    running: dict[Future, Search] = {}
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        while True:
            # The searches with the fewest trials go first, so a time budget is shared.
            for s in sorted(searches, key=lambda s: s.trials):
                if time.monotonic() > deadline or len(running) >= args.jobs:
                    break
                held = sum(r.cap_gb + TRIAL_OVERHEAD_GB for r in running.values())
                if running and held + s.cap_gb + TRIAL_OVERHEAD_GB > 0.92 * card_gb:
                    continue  # only launch trials whose caps all fit the card together
                tokens = searcher.probe(s)
                if tokens is None:
                    continue
                s.busy = True
                case = trial_case(args, device, s.model, s.loss, s.impl, s.cap_gb, tokens)
                running[pool.submit(common.run_isolated, MODULE, case, args.trial_timeout)] = s
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                s = running.pop(future)
                row = future.result()
                searcher.record(s, row)
                print(_progress(s, row), flush=True)
                if args.out is not None:
                    rows = [search_row(one, searcher, device, args) for one in searches]
                    common.write_json(rows + kept, args.out, quiet=True)
    return [search_row(s, searcher, device, args) for s in searches] + kept


def _progress(s: Search, row: dict[str, Any]) -> str:
    what = f"{s.model} {s.impl:>5} {s.loss:<40} cap {s.cap_gb:g} GB, {row['tokens']:>6} tokens"
    status = row.get("status") or row.get("error")
    if status == "ok":
        status = f"ok, {row['total_peak_mb']:.0f} MiB peak, {row['ms']:.0f} ms"
    top = min((bound for bound in (s.hi, s.slow) if bound is not None), default=None)
    return f"{what}: {status}  -> [{s.lo}, {top if top is not None else '?'})"


def run_cpu(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """One trial per (model, mixture, impl, tokens): the path runs; no cap is emulated.

    Args:
        args: the parsed flags.
        device: the CPU.

    Returns:
        The trials' rows.
    """
    rows = []
    impls = [i for i in args.impls if i != "unsloth"]
    for model, loss, impl, tokens in itertools.product(args.models, args.mixes, impls, args.tokens):
        case = trial_case(args, device, model, loss, impl, None, tokens)
        row = common.run_isolated(MODULE, case, args.trial_timeout)
        print(f"{model} {impl} {loss} {tokens} tokens: {row.get('status') or row.get('error')}")
        rows.append(row)
    return rows


def unsloth_rows(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """Skipped rows for `--impls unsloth`, one per (model, mixture), saying why.

    Args:
        args: the parsed flags.
        device: the device of the run.

    Returns:
        The rows.
    """
    reason = (
        "unsloth builds models only from pretrained checkpoints (FastLanguageModel."
        "from_pretrained); these random-weight models are built with transformers"
    )
    rows = []
    for model in args.models:
        for loss in args.mixes:
            spec = MODELS[model]
            case = dict(
                impl="unsloth",
                loss=loss,
                vocab=spec["vocab_size"],
                hidden=spec["hidden_size"],
                dtype=WEIGHTS,
            )
            rows.append(
                {
                    **common.skipped_row(case, reason),
                    "device": common.device_name(device),
                    "model": model,
                }
            )
    return rows


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Add vs_naive (tokens / naive's, same mixture) and vs_ce (tokens / cross-entropy's,
    same impl) to the measured rows of a cap.

    Args:
        rows: changed in place.
    """
    found = {
        (r["model"], r.get("cap_gb"), r["impl"], r["loss"]): r for r in rows if common.measured(r)
    }
    for row in rows:
        if not common.measured(row) or not row["tokens"] or row.get("cap_gb") is None:
            continue
        key = (row["model"], row.get("cap_gb"))
        for name, impl, loss in (
            ("vs_naive", "naive", row["loss"]),
            ("vs_ce", row["impl"], "cross_entropy"),
        ):
            ref = found.get((*key, impl, loss))
            if ref is not None and ref is not row and ref["tokens"]:
                row[name] = row["tokens"] / ref["tokens"]


def main(argv: list[str] | None = None) -> None:
    """The command line: search (CUDA) or run one trial per case (CPU), print and write rows.

    Args:
        argv: the arguments; None reads `sys.argv`.
    """
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common.add_output_args(parser)
    parser.add_argument("--models", nargs="+", choices=list(MODELS))
    parser.add_argument(
        "--layers", type=common.positive_int, help="build only this many decoder layers (reported)"
    )
    parser.add_argument(
        "--caps", nargs="+", type=common.positive_float, default=[8, 12, 16, 24], help="GB, CUDA"
    )
    parser.add_argument(
        "--mixes",
        nargs="+",
        type=common.losses_arg,
        default=list(MIXES),
        metavar="MIX",
        help="losses: a name or name:weight,name:weight (as qseg train --loss)",
    )
    parser.add_argument("--impls", nargs="+", default=["qseg", "naive"], choices=IMPLS)
    parser.add_argument("--tokens", nargs="+", type=common.positive_int, help="CPU: trial lengths")
    parser.add_argument(
        "--granularity", type=common.positive_int, default=512, help="lengths are multiples"
    )
    parser.add_argument(
        "--resolution", type=float, default=0.05, help="stop when the bracket is this narrow"
    )
    parser.add_argument(
        "--start-tokens", type=common.positive_int, default=4096, help="first probe"
    )
    parser.add_argument(
        "--max-tokens", type=common.positive_int, default=131072, help="longest length tried"
    )
    parser.add_argument(
        "--jobs", type=common.positive_int, default=3, help="concurrent trials on the card"
    )
    parser.add_argument(
        "--time-budget",
        type=common.positive_float,
        default=math.inf,
        help="seconds; then no new trials, and brackets are reported",
    )
    parser.add_argument(
        "--resume", type=Path, help="an earlier run's JSON: go on from its brackets (CUDA)"
    )
    parser.add_argument(
        "--resume-if-same-card",
        action="store_true",
        help="with --resume: a file searched on another card or setup is set aside (a fresh "
        "search) instead of refused; for scripts that resume committed results",
    )
    parser.add_argument("--trial-timeout", type=common.positive_float, default=300)
    parser.add_argument(
        "--threads", type=common.positive_int, default=1, help="CPU threads per trial"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.case:
        common.emit_row(run_trial(json.loads(args.case)))
        return
    device = common.resolve_device(args.device)
    if args.models is None:
        args.models = ["tiny-llama"] if args.quick or device.type == "cpu" else ["llama3.1-8b"]
    if args.tokens is None:
        args.tokens = [64] if args.quick else [512]
    common.check_out_path(args.out, args.overwrite)
    if args.resume is not None and (device.type != "cuda" or not args.resume.is_file()):
        raise SystemExit(f"--resume {args.resume}: give the JSON file of an earlier CUDA search")
    rows = run_cpu(args, device) if device.type == "cpu" else search_all(args, device)
    if "unsloth" in args.impls:
        rows += unsloth_rows(args, device)
    add_ratios(rows)
    print(f"\ndevice: {common.device_name(device)}; torch {torch.__version__}")
    reduced = {r["model"]: r["layers"] for r in rows if r.get("layers") != r.get("full_layers")}
    for model, layers in reduced.items():
        print(f"NOTE: {model} built with {layers} of {MODELS[model]['num_hidden_layers']} layers")
    print("\n" + common.markdown_table(rows, COLUMNS))
    if args.out:
        common.write_json(rows, args.out)
    if any(r.get("error") for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
