"""The longest sequence QLoRA trains one optimizer step at, per memory cap and loss mix.

A model of real architecture (Llama-3.1-8B or Qwen2.5-7B shapes, from the config dicts
below; nothing is downloaded) gets random weights, its decoder layers quantized to 4-bit
NF4 with bitsandbytes (double quantization, bf16 compute), embeddings, norms and head
frozen in bf16, LoRA from peft on every attention and MLP projection
(`qseg.models.LoraSettings` defaults) and non-reentrant gradient checkpointing, as
`qseg.models.load_model` sets it up; the step runs under bf16 autocast as `qseg train`
runs it. Batch 1, labels from a Zipf law with 10% ignored. One trial = one
fresh process that caps its CUDA memory with
`torch.cuda.set_per_process_memory_fraction(cap / card memory)`, builds the model layer
by layer under that cap, and runs one AdamW step:
- `qseg`: decoder hidden states -> `qseg.losses.FusedLinearLoss` on the head (chunk "auto");
- `naive`: the model's full logits -> `qseg.losses.loss_from_logits`.
The cap counts PyTorch's allocations only; a real card of that size also holds the CUDA
context (about 0.5 GB), so its limit sits slightly lower.

Search: per (mix, impl, cap), the longest length (a multiple of `--granularity`) that
trains, to within `--resolution` (5%). A trial that fits reports its peak; the line
through the two longest fitting trials predicts where the peak meets the cap, and that
is the next probe (after an overshoot: just below the OOM once, then bisection). A fit
under one cap is a fit under larger caps, and an OOM one under smaller ones. Searches
take turns; with `--time-budget` no trial starts after it, and rows report the bracket
they have (`converged` false). Up to `--jobs` trials share the card, as long as their
caps fit on it together. `unsloth` (if asked for) gives a skipped row: it builds models
from pretrained checkpoints only.

Rows: `tokens` is the longest length that trained, `oom_tokens` the shortest that ran
out of memory (None: none did), `timeout_tokens` the shortest whose trial ran past
`--trial-timeout` (it bounds the search too, and the row is then not `converged`),
`peak_mb` the memory the step added at `measured_tokens` (the cap's own longest fitting
trial) and `total_peak_mb` the whole process's peak then; `vs_naive` and `vs_ce` divide
`tokens` by naive's (same mix) and by cross-entropy's. `ms` is that one step's wall time,
first-call warm-up (torch.compile, cuBLAS) and concurrent trials on the card included:
a sign of cost, not a speed comparison (`benchmarks.loss_memory` compares speed).

`--resume FILE` seeds the brackets with an earlier run's rows (same card, model, layers
and granularity), so a search cut short by `--time-budget` goes on where it stopped: with
device time scarce, two short calls add up to one long one. The earlier rows of searches
this run does not make (other caps, mixes or impls) are kept in its output as they were
(failed ones are not). `--resume-if-same-card` sets aside, instead of refusing, a file
searched on another card, so scripts can resume committed results on whatever card.

On CPU there is no cap to search: `--device cpu` runs one trial per (mix, impl) at
`--tokens` and reports its memory and time, so the path is exercised without a GPU.

    python -m benchmarks.max_context --device cuda --caps 16 24 --out max_context.json
    python -m benchmarks.max_context --device cuda --caps 16 24 --resume max_context.json \
        --out max_context.json --overwrite
    python -m benchmarks.max_context --device cpu --quick
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import sys
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks import common

MODULE = "benchmarks.max_context"
GiB = 1 << 30
MIXES = ("cross_entropy", "lovasz", "cross_entropy:0.6+generalized_dice:0.4")
IMPLS = ("qseg", "naive", "unsloth")
# Configs of the published models (config.json of meta-llama/Llama-3.1-8B and
# Qwen/Qwen2.5-7B), written out so nothing is downloaded; tiny-llama is for CPU checks.
MODELS: dict[str, dict[str, Any]] = {
    "llama3.1-8b": dict(
        model_type="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ),
    "qwen2.5-7b": dict(
        model_type="qwen2",
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        use_sliding_window=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    ),
    "tiny-llama": dict(
        model_type="llama",
        vocab_size=2048,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    ),
}
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
# How far below the other mixes' predicted limit a search without trials of its own starts.
PEER_MARGIN = 0.05
MODEL_TOO_BIG = "the model alone does not fit under the cap"  # a row's note
# Memory a concurrent trial holds outside its cap (CUDA context, cuBLAS, bitsandbytes).
TRIAL_OVERHEAD_GB = 1.5


# -------------------------------------------------------------------- model and trial


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def quantize_linears(module: nn.Module, device: torch.device) -> None:
    """Replace every nn.Linear inside `module` by a bitsandbytes NF4 Linear4bit (as QLoRA)."""
    import bitsandbytes as bnb

    for name, child in list(module.named_children()):
        if not isinstance(child, nn.Linear):
            quantize_linears(child, device)
            continue
        with torch.device("meta"):
            layer = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                compute_dtype=torch.bfloat16,
                compress_statistics=True,
                quant_type="nf4",
            )
        layer.weight = bnb.nn.Params4bit(
            child.weight.data,
            requires_grad=False,
            compress_statistics=True,
            quant_type="nf4",
            module=layer,
        ).to(device)
        if child.bias is not None:
            layer.bias = nn.Parameter(child.bias.data, requires_grad=False)
        setattr(module, name, layer)


def build_model(name: str, layers: int | None, device: torch.device) -> nn.Module:
    """The QLoRA model of `name` with random weights, built layer by layer on `device`.

    The skeleton is made on the meta device; each decoder layer is then created for real
    and quantized at once, so the build never holds more than one bf16 layer beyond the
    4-bit model (it runs under the trial's memory cap, like loading a quantized checkpoint).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from qseg.models import CHECKPOINTING_KWARGS, LoraSettings, decoder_of

    spec = dict(MODELS[name])
    if layers is not None:
        spec["num_hidden_layers"] = layers
    config = AutoConfig.for_model(**spec)
    config.use_cache = False
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    decoder = decoder_of(model)
    with torch.device(device), default_dtype(torch.bfloat16):
        for index in range(len(decoder.layers)):
            layer = type(decoder.layers[index])(config, index)
            quantize_linears(layer, device)
            decoder.layers[index] = layer
        decoder.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        decoder.norm = type(decoder.norm)(config.hidden_size, eps=config.rms_norm_eps)
        decoder.rotary_emb = type(decoder.rotary_emb)(config=config)
        model.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
    left_on_meta = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left_on_meta:
        raise RuntimeError(f"parts of the model were never built: {left_on_meta[:5]}")
    model.requires_grad_(False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=CHECKPOINTING_KWARGS)
    lora = LoraSettings()
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.targets),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config).train()  # train mode: checkpointing and dropout on


WEIGHTS = "nf4, bf16 embeddings and head"  # the `dtype` column


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, case: dict, labels, ids) -> None:
    from qseg.losses import FusedLinearLoss, loss_from_logits
    from qseg.models import backbone_hidden_states, output_head

    mix = common.parse_mix(case["loss"])
    optimizer.zero_grad(set_to_none=True)
    # As `qseg train` runs on a GPU: the model under bf16 autocast, the loss outside it.
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=ids.is_cuda):
        if case["impl"] == "naive":
            outputs = model(input_ids=ids, use_cache=False).logits
        else:
            outputs = backbone_hidden_states(model, ids)
    if case["impl"] == "naive":
        loss = loss_from_logits(outputs, labels, mix)
    else:
        loss = FusedLinearLoss(mix, chunk_size="auto")(outputs, output_head(model), labels)
    loss.backward()
    optimizer.step()


def run_trial(case: dict[str, Any]) -> dict[str, Any]:
    """One trial in this (fresh) process: build under the cap, train one step, report."""
    device = torch.device(case["device"])
    spec = MODELS[case["model"]]
    row = dict(
        impl=case["impl"],
        loss=case["loss"],
        tokens=case["tokens"],
        vocab=spec["vocab_size"],
        hidden=spec["hidden_size"],
        dtype=WEIGHTS,
        device=common.device_name(device),
        model=case["model"],
        layers=case["layers"] or spec["num_hidden_layers"],
        full_layers=spec["num_hidden_layers"],
        cap_gb=case["cap_gb"],
    )
    if device.type == "cuda" and case["cap_gb"] is not None:
        total = torch.cuda.get_device_properties(device).total_memory
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.set_per_process_memory_fraction(case["cap_gb"] * GiB / total, index)
    if device.type == "cpu":
        torch.set_num_threads(case["threads"])
    generator = torch.Generator().manual_seed(case["seed"])
    labels = common.zipf_labels(1, case["tokens"], spec["vocab_size"], generator=generator)
    ids = labels.clamp(min=0).roll(1, dims=1)  # inputs: the labels shifted right, as in text
    stage = "build"
    try:
        model = build_model(case["model"], case["layers"], device)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        labels, ids = labels.to(device), ids.to(device)
        stage = "step"
        row["model_mb"] = _allocated_mb(device)
        start = time.perf_counter()
        row["peak_mb"] = common.peak_added_mb(
            lambda: train_step(model, optimizer, case, labels, ids), device
        )
        row["ms"] = (time.perf_counter() - start) * 1e3
        row["total_peak_mb"] = _total_peak_mb(device)
        row["status"] = "ok"
    except (RuntimeError, torch.OutOfMemoryError) as error:
        if not common.is_oom(error):
            raise
        row.update(status="oom", oom_stage=stage, peak_mb=None, ms=None)
    return row


def _allocated_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / common.MiB
    return common.proc_status_kb("VmRSS") / 1024


def _total_peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / common.MiB
    return common.proc_status_kb("VmHWM") / 1024


# ----------------------------------------------------------------------------- search


@dataclass
class Search:
    """The bracket [lo fits, hi runs out of memory] for one (model, mix, impl, cap)."""

    model: str
    loss: str
    impl: str
    cap_gb: float
    lo: int = 0
    hi: int | None = None
    best: dict | None = None  # this search's own trial at `lo`
    trials: int = 0
    misses: int = 0  # this search's own trials that ran out of memory
    busy: bool = False
    model_too_big: bool = False  # the 4-bit model alone ran out of memory under the cap
    slow: int | None = None  # the shortest length whose trial ran past --trial-timeout
    error: str | None = None

    @property
    def group(self) -> tuple[str, str, str]:
        return self.model, self.loss, self.impl


@dataclass
class Searcher:
    """Chooses probes, tracks brackets, and shares what one cap's trial says about others.

    A search is done when its bracket is at most `granularity` tokens wide, or at most
    `resolution` of the length that fits (5% of 40k tokens is plenty for this table and
    saves trials that each build an 8B model).
    """

    granularity: int
    max_tokens: int
    start_tokens: int
    searches: list[Search]
    resolution: float = 0.0
    # (tokens, model_mb, total_peak_mb) of every fitting trial, per group.
    points: dict[tuple, list[tuple[int, float, float]]] = field(default_factory=dict)

    def step(self, s: Search) -> int:
        """The bracket width at which `s` is done, a multiple of the granularity."""
        g = self.granularity
        return max(g, int(self.resolution * s.lo) // g * g)

    def done(self, s: Search) -> bool:
        return s.error is not None or self._hi(s) - s.lo <= self.step(s)

    def _hi(self, s: Search) -> int:
        # A trial too slow to finish bounds the search too: not a memory limit, but
        # nothing longer can be measured within the timeout either.
        bounds = (s.hi, s.slow, self.max_tokens + self.granularity)
        return min(bound for bound in bounds if bound is not None)

    def converged(self, s: Search) -> bool:
        """Done, and bracketed by an out-of-memory trial (or --max-tokens), not a timeout."""
        return self.done(s) and s.error is None and (s.slow is None or self._hi(s) < s.slow)

    def probe(self, s: Search) -> int | None:
        """The next length to try for `s`, or None when it must wait or is done."""
        if s.busy or self.done(s):
            return None
        # Until a search has its own trials, the other mixes' (same model and impl) guide
        # it: the decoder's memory dominates, the loss shifts it only a little, so their
        # prediction less a margin most likely fits.
        own = self.points.get(s.group)
        guess = self._predict(own, s.cap_gb) if own else self._peer_guess(s)
        if guess is None and not own and s.lo == 0 and s.hi is None:
            busy_peer = any(o.busy for o in self.searches if o.group == s.group)
            return None if busy_peer else self.start_tokens
        hi = self._hi(s)
        if guess is None or guess >= hi:
            # The line overshot: memory grows a little faster than linearly. Right below
            # the OOM is then the best bet, once; after that, bisect.
            guess = hi - self.step(s) if s.misses == 0 and guess else (s.lo + hi) // 2
        return max(guess // self.granularity * self.granularity, s.lo + self.step(s))

    def _peer_guess(self, s: Search) -> int | None:
        """The lowest limit the other mixes' trials predict for `s`'s cap, less a margin."""
        guesses = [
            self._predict(points, s.cap_gb)
            for (model, loss, impl), points in self.points.items()
            if model == s.model and impl == s.impl and loss != s.loss
        ]
        guesses = [g for g in guesses if g is not None]
        return int(min(guesses) * (1 - PEER_MARGIN)) if guesses else None

    @staticmethod
    def _predict(points: list[tuple[int, float, float]], cap_gb: float) -> int | None:
        """Where the peak reaches the cap, on the line through the two longest fitting
        trials (one trial: the line through it and the model's own memory)."""
        (tokens, model_mb, peak_mb), *rest = sorted(set(points), reverse=True)
        rest = [point for point in rest if point[0] < tokens]
        before_tokens, before_mb = (rest[0][0], rest[0][2]) if rest else (0, model_mb)
        per_token = (peak_mb - before_mb) / (tokens - before_tokens)
        if per_token <= 0:
            return None
        return int(tokens + (cap_gb * 1024 - peak_mb) / per_token)

    def record(self, s: Search, row: dict[str, Any]) -> None:
        s.busy, s.trials = False, s.trials + 1
        tokens = row["tokens"]
        if row.get("status") == "ok":
            self.points.setdefault(s.group, []).append(
                (tokens, row["model_mb"], row["total_peak_mb"])
            )
            if tokens > s.lo:
                s.best = row
            for other in self.searches:
                if other.group == s.group and other.cap_gb >= s.cap_gb:
                    other.lo = max(other.lo, tokens)
        elif row.get("status") == "oom":
            s.misses += 1
            too_big = row.get("oom_stage") == "build"  # then no length can train
            for other in self.searches:
                # The build does not depend on the loss: a model too big for this cap is
                # too big for every mix and impl under it.
                related = other.model == s.model if too_big else other.group == s.group
                if related and other.cap_gb <= s.cap_gb:
                    bound = self.granularity if too_big else tokens
                    other.hi = bound if other.hi is None else min(other.hi, bound)
                    other.model_too_big = other.model_too_big or too_big
        elif row.get("status") == "timeout":
            s.slow = tokens if s.slow is None else min(s.slow, tokens)
        else:
            s.error = row.get("error", "no status")

    def resume(self, rows: list[dict[str, Any]]) -> None:
        """Seed the brackets with the rows of an earlier search (`_search_row`'s), as if
        their trials had run here; rows of other searches are ignored, failed ones retried."""
        earlier = {(r.get("model"), r.get("loss"), r.get("impl"), r.get("cap_gb")): r for r in rows}
        for s in self.searches:
            row = earlier.get((s.model, s.loss, s.impl, s.cap_gb))
            if row is None or row.get("error"):
                continue
            if row.get("measured_tokens") and row.get("model_mb") is not None:
                best = {k: row.get(k) for k in ("peak_mb", "total_peak_mb", "ms", "model_mb")}
                self.record(s, {**best, "status": "ok", "tokens": row["measured_tokens"]})
            if row.get("oom_tokens") is not None:
                stage = "build" if row.get("note") == MODEL_TOO_BIG else "step"
                self.record(s, {"status": "oom", "tokens": row["oom_tokens"], "oom_stage": stage})
            s.lo = max(s.lo, row["tokens"])  # may come from a smaller cap not searched now
            s.trials = row["trials"]


def search_all(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """Run every search; after each trial the rows so far are kept in `args.out`."""
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
                case = _trial_case(args, device, s.model, s.loss, s.impl, s.cap_gb, tokens)
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
                    rows = [_search_row(one, searcher, device, args) for one in searches]
                    common.write_json(rows + kept, args.out, quiet=True)
    return [_search_row(s, searcher, device, args) for s in searches] + kept


def earlier_rows(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """`--resume`'s rows, refused when they were searched on another card or setup (set
    aside, with a note, under `--resume-if-same-card`)."""
    try:
        rows = json.loads(args.resume.read_text())
    except json.JSONDecodeError as error:
        raise SystemExit(f"--resume {args.resume} is not a JSON file of rows: {error}") from error
    here = {"device": common.device_name(device), "granularity": args.granularity}
    for row in rows:
        if row.get("model") not in args.models or row.get("cap_gb") is None:
            continue
        there = {"device": row.get("device"), "granularity": row.get("granularity")}
        layers = args.layers or MODELS[row["model"]]["num_hidden_layers"]
        if there != here or row.get("layers") != layers:
            message = (
                f"--resume {args.resume}: its {row['model']} rows were searched with "
                f"{there}, {row.get('layers')} layers; this run has {here}, {layers} layers"
            )
            if args.resume_if_same_card:
                print(f"{message}: not resumed, a fresh search", flush=True)
                return []
            raise SystemExit(f"{message}. Resume only a search of the same card and setup.")
    return rows


def _trial_case(args, device, model, loss, impl, cap_gb, tokens) -> dict[str, Any]:
    return dict(
        model=model,
        layers=args.layers,
        loss=loss,
        impl=impl,
        cap_gb=cap_gb,
        tokens=tokens,
        device=str(device),
        seed=args.seed,
        threads=args.threads,
    )


def _progress(s: Search, row: dict[str, Any]) -> str:
    what = f"{s.model} {s.impl:>5} {s.loss:<40} cap {s.cap_gb:g} GB, {row['tokens']:>6} tokens"
    status = row.get("status") or row.get("error")
    if status == "ok":
        status = f"ok, {row['total_peak_mb']:.0f} MiB peak, {row['ms']:.0f} ms"
    top = min((bound for bound in (s.hi, s.slow) if bound is not None), default=None)
    return f"{what}: {status}  -> [{s.lo}, {top if top is not None else '?'})"


def _search_row(s: Search, searcher: Searcher, device: torch.device, args) -> dict[str, Any]:
    spec = MODELS[s.model]
    row = dict(
        impl=s.impl,
        loss=s.loss,
        tokens=s.lo,
        vocab=spec["vocab_size"],
        hidden=spec["hidden_size"],
        dtype=WEIGHTS,
        device=common.device_name(device),
        model=s.model,
        layers=args.layers or spec["num_hidden_layers"],
        full_layers=spec["num_hidden_layers"],
        cap_gb=s.cap_gb,
        oom_tokens=s.hi,
        timeout_tokens=s.slow,
        converged=searcher.converged(s),
        trials=s.trials,
        granularity=args.granularity,
        resolution=args.resolution,
        jobs=args.jobs,
        peak_mb=None,
        total_peak_mb=None,
        ms=None,
    )
    if s.best is not None:  # figures of this cap's own longest fitting trial
        row.update(
            peak_mb=s.best["peak_mb"],
            total_peak_mb=s.best["total_peak_mb"],
            ms=s.best["ms"],
            model_mb=s.best["model_mb"],
            measured_tokens=s.best["tokens"],
        )
    if s.model_too_big:
        row["note"] = MODEL_TOO_BIG
    elif s.slow is not None and not searcher.converged(s):
        row["note"] = (
            f"the trial at {s.slow} tokens ran past --trial-timeout; the memory limit may "
            "lie beyond what was measured"
        )
    elif s.hi is None and s.lo >= args.max_tokens:
        row["note"] = f"trains at --max-tokens {args.max_tokens}; the limit lies beyond"
    if s.error:
        row["error"] = s.error
    return row


# ----------------------------------------------------------------------------- driver


def run_cpu(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """One trial per (model, mix, impl, tokens): the path runs; no cap is emulated."""
    rows = []
    impls = [i for i in args.impls if i != "unsloth"]
    for model, loss, impl, tokens in itertools.product(args.models, args.mixes, impls, args.tokens):
        case = _trial_case(args, device, model, loss, impl, None, tokens)
        row = common.run_isolated(MODULE, case, args.trial_timeout)
        print(f"{model} {impl} {loss} {tokens} tokens: {row.get('status') or row.get('error')}")
        rows.append(row)
    return rows


def unsloth_rows(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
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
    """vs_naive: tokens / naive's for the same mix; vs_ce: tokens / cross-entropy's, same impl."""
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
        type=common.mix_arg,
        default=list(MIXES),
        metavar="MIX",
        help="losses: a name or name:weight+name:weight",
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
