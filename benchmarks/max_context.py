"""The longest sequence QLoRA trains one optimizer step at, per memory cap and loss mixture.

Each trial builds a 4-bit QLoRA model of a real architecture (Llama-3.1-8B or Qwen2.5-7B
shapes, random weights, nothing downloaded) in a fresh process under a CUDA memory cap
and trains one step at one length: `benchmarks/context_trial.py` says how. Its setup:
- `--backends`: `transformers` (bitsandbytes and peft, as `qseg.models.load_model`) and/or
  `unsloth` (its FastLanguageModel, from a random-weight checkpoint of the shape saved
  once and reused across calls: `benchmarks/context_models.py`);
- `--impls`: `qseg` (hidden states -> fused loss on the head) and `naive` (full logits ->
  the loss) on transformers; `qseg` and `unsloth` (unsloth's own fused cross-entropy, the
  bar qseg is held to; cross-entropy only) on unsloth;
- `--lora-r`: the LoRA ranks;
- `--offload-activations`: transformers keeps checkpointed layer inputs in CPU memory
  (on a GPU; a CPU trial trains without it and its row says so). unsloth's own
  checkpointing always offloads, so its rows say `offload_activations` true.
Every row names `backend`, `impl`, `lora_r` and `offload_activations`. Where unsloth
cannot run (no CUDA GPU, not installed) its rows are skipped rows saying why.

Search: per (mixture, setup, cap), the longest length (a multiple of `--granularity`)
that trains, to within `--resolution`; each trial's peak predicts the next probe
(`benchmarks/context_search.py`). Searches take turns; with `--time-budget` no trial
starts after it (the unsloth checkpoint's first save counts in it), and rows report the
bracket they have (`converged` false). Up to `--jobs` trials share the card, as long as
their caps fit on it together. Mixtures are written as on `qseg train --loss`:
`cross_entropy:0.6,lovasz:0.4`.

Rows: `tokens` is the longest length that trained, `oom_tokens` the shortest that ran
out of memory (None: none did), `timeout_tokens` the shortest whose trial ran past
`--trial-timeout` (it bounds the search too, and the row is then not `converged`),
`peak_mb` the memory the step added at `measured_tokens` (the cap's own longest fitting
trial) and `total_peak_mb` the whole process's peak then; `vs_naive` and `vs_ce` divide
`tokens` by naive's (same mixture and setup, transformers), by cross-entropy's (same
setup) and `vs_unsloth` by unsloth's own path's (same cap and LoRA r). `ms` is that one
step's wall time, first-call warm-up (torch.compile, cuBLAS) and concurrent trials on the
card included: a sign of cost, not a speed comparison.

`--resume FILE` seeds the brackets with an earlier run's rows (same card, model, layers
and granularity), so a search cut short by `--time-budget` goes on where it stopped: with
device time scarce, two short calls add up to one long one. The earlier rows of searches
this run does not make (other caps, mixtures or impls) are kept in its output as they
were (failed ones are not); rows written before rows named their setup are read as
transformers, LoRA r 8, no offloading, what they ran. `--resume-if-same-card` sets aside,
instead of refusing, a file searched on another card, so scripts can resume committed
results on whatever card.

`--tokens` runs no search: one trial per (mixture, setup, length), without a cap, and
with `--steps N` its `tokens_per_s` over the steps after the first (the speed of a setup,
e.g. offloading on vs off, at a length both fit). On CPU there is no cap to search:
`--device cpu` always runs so (at 512 tokens by default), so the path is exercised
without a GPU.

    python benchmarks/max_context.py --device cuda --caps 16 24 --out max_context.json
    python benchmarks/max_context.py --device cuda --caps 16 24 --resume max_context.json \
        --out max_context.json --overwrite
    python benchmarks/max_context.py --device cuda --backends unsloth --impls qseg unsloth \
        --lora-r 32 --caps 16 --out unsloth.json
    python benchmarks/max_context.py --device cuda --tokens 8192 --steps 4 \
        --offload-activations --out offload_speed.json
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
from benchmarks.context_models import MODELS, save_checkpoint
from benchmarks.context_search import Search, Searcher, earlier_rows, search_row
from benchmarks.context_setups import (
    BACKEND_IMPLS,
    IMPLS,
    add_ratios,
    row_key,
    runnable,
    unsloth_missing,
    unsloth_rows,
)
from benchmarks.context_trial import GiB, run_trial, trial_case

MODULE = "benchmarks.max_context"  # the trials' worker: this module with --case
MIXES = ("cross_entropy", "lovasz", "cross_entropy:0.6,generalized_dice:0.4")
COLUMNS = (
    "model",
    "layers",
    "backend",
    "impl",
    "lora_r",
    "offload_activations",
    "loss",
    "cap_gb",
    "tokens",
    "oom_tokens",
    "converged",
    "trials",
    "peak_mb",
    "total_peak_mb",
    "ms",
    "tokens_per_s",
    "vs_naive",
    "vs_ce",
    "vs_unsloth",
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
    deadline = time.monotonic() + args.time_budget
    searches = [
        Search(model=model, loss=loss, cap_gb=cap, **setup)
        for model in args.models
        for loss, setup in runnable(args, device)
        for cap in sorted(args.caps)
    ]
    for model in sorted({s.model for s in searches if s.backend == "unsloth"}):
        folder, written = save_checkpoint(model, args.layers, device)
        print(f"{model}: unsloth loads {folder} ({'saved now' if written else 'reused'})")
    searcher = Searcher(
        args.granularity, args.max_tokens, args.start_tokens, searches, args.resolution
    )
    # The earlier rows of searches not run now are kept, so the output is a superset.
    kept = []
    if args.resume is not None:
        earlier = earlier_rows(args, device)
        searcher.resume(earlier)
        now = {s.key for s in searches}
        kept = [
            r
            for r in earlier
            if r.get("cap_gb") is not None
            and not r.get("error")  # an old failure must not fail every later run
            and row_key(r) not in now
        ]
    card_gb = torch.cuda.get_device_properties(device).total_memory / GiB
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
                case = trial_case(args, device, s.model, s.loss, s.setup, s.cap_gb, tokens)
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
    setup = f"{s.backend} {s.impl} r {s.lora_r}{' offload' if s.offload_activations else ''}"
    what = f"{s.model} {setup} {s.loss:<40} cap {s.cap_gb:g} GB, {row['tokens']:>6} tokens"
    status = row.get("status") or row.get("error")
    if status == "ok":
        status = f"ok, {row['total_peak_mb']:.0f} MiB peak, {row['ms']:.0f} ms"
    top = min((bound for bound in (s.hi, s.slow) if bound is not None), default=None)
    return f"{what}: {status}  -> [{s.lo}, {top if top is not None else '?'})"


def run_lengths(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """One trial per (model, mixture, setup, length in --tokens), without a cap.

    Args:
        args: the parsed flags.
        device: the device of the run.

    Returns:
        The trials' rows.
    """
    rows = []
    pairs = runnable(args, device)
    if any(setup["backend"] == "unsloth" for _, setup in pairs):
        for model in args.models:
            save_checkpoint(model, args.layers, device)
    for model, (loss, setup), tokens in itertools.product(args.models, pairs, args.tokens):
        case = trial_case(args, device, model, loss, setup, None, tokens)
        row = common.run_isolated(MODULE, case, args.trial_timeout)
        what = f"{model} {setup['backend']} {setup['impl']} r {setup['lora_r']} {loss}"
        print(f"{what}, {tokens} tokens: {row.get('status') or row.get('error')}")
        rows.append(row)
    return rows


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
    parser.add_argument(
        "--backends", nargs="+", default=["transformers"], choices=list(BACKEND_IMPLS)
    )
    parser.add_argument(
        "--impls",
        nargs="+",
        default=["qseg", "naive"],
        choices=IMPLS,
        help="naive runs on transformers, unsloth (its own loss) on unsloth, qseg on both",
    )
    parser.add_argument(
        "--lora-r", nargs="+", type=common.positive_int, default=[8], help="LoRA ranks"
    )
    parser.add_argument(
        "--offload-activations",
        action="store_true",
        help="transformers: checkpointed layer inputs wait in CPU memory (GPU only)",
    )
    parser.add_argument(
        "--tokens",
        nargs="+",
        type=common.positive_int,
        help="no search: one trial per length, without a cap (the CPU always runs so)",
    )
    parser.add_argument(
        "--steps",
        type=common.positive_int,
        default=1,
        help="optimizer steps per trial; from 2, rows give tokens_per_s after the first",
    )
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
    for impl in args.impls:
        if not any(impl in BACKEND_IMPLS[backend] for backend in args.backends):
            runs_on = [b for b, impls in BACKEND_IMPLS.items() if impl in impls]
            parser.error(f"--impls {impl} runs on --backends {' or '.join(runs_on)}")

    if args.case:
        common.emit_row(run_trial(json.loads(args.case)))
        return
    device = common.resolve_device(args.device)
    if args.models is None:
        args.models = ["tiny-llama"] if args.quick or device.type == "cpu" else ["llama3.1-8b"]
    if args.tokens is None and device.type == "cpu":
        args.tokens = [64] if args.quick else [512]
    common.check_out_path(args.out, args.overwrite)
    if args.resume is not None and (args.tokens or not args.resume.is_file()):
        raise SystemExit(f"--resume {args.resume}: give the JSON file of an earlier CUDA search")
    rows = run_lengths(args, device) if args.tokens else search_all(args, device)
    reason = unsloth_missing(device)
    if reason is not None and "unsloth" in args.backends:
        rows += unsloth_rows(args, device, reason)
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
