"""The longest-context search: per (model, losses, setup, cap), the bracket [longest length
that trained, shortest that ran out of memory], which probe to try next, and how an earlier
run's rows seed the brackets again.

A trial that fits reports its peak; the line through the two longest fitting trials
predicts where the peak meets the cap, and that is the next probe (after an overshoot:
just below the OOM once, then bisection). A fit under one cap is a fit under larger caps,
and an OOM one under smaller ones; a search without trials of its own starts from what
the other mixtures' trials predict. Nothing here runs a trial: `benchmarks.max_context`
runs them (`benchmarks.context_trial`) and `record`s what they say.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from typing import Any

import torch

from benchmarks import common
from benchmarks.context_models import MODELS, WEIGHTS
from benchmarks.context_setups import EARLIER_SETUP, SETUP_KEYS, row_key

# How far below the other mixtures' predicted limit a search without trials of its own starts.
PEER_MARGIN = 0.05
MODEL_TOO_BIG = "the model alone does not fit under the cap"  # a row's note


@dataclass
class Search:
    """The bracket [lo fits, hi runs out of memory] for one (model, losses, setup, cap).

    `loss` is the losses' text form, as the rows' `loss` column holds it. The setup: the
    `backend` that loads the model (transformers | unsloth), the `impl` that computes the
    loss (qseg | naive | unsloth, unsloth's own fused cross-entropy), the LoRA rank, and
    whether checkpointed activations wait in CPU memory.
    """

    model: str
    loss: str
    impl: str
    cap_gb: float
    backend: str = EARLIER_SETUP["backend"]
    lora_r: int = EARLIER_SETUP["lora_r"]
    offload_activations: bool = EARLIER_SETUP["offload_activations"]
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
    def setup(self) -> dict[str, Any]:
        """The setup keys (`SETUP_KEYS`) and their values, as rows and trial cases hold them."""
        return {key: getattr(self, key) for key in SETUP_KEYS}

    @property
    def group(self) -> tuple:
        """(model, loss, *setup): the searches of one group differ only in their cap."""
        return (self.model, self.loss, *self.setup.values())

    @property
    def key(self) -> tuple:
        """What identifies this search in result rows (`row_key`)."""
        return (self.model, self.loss, self.cap_gb, *self.setup.values())


@dataclass
class Searcher:
    """Chooses probes, tracks brackets, and shares what one cap's trial says about others.

    A search is done when its bracket is at most `granularity` tokens wide, or at most
    `resolution` of the length that fits: a few percent is as fine as the table needs, and
    every trial saved is a model build saved.
    """

    granularity: int
    max_tokens: int
    start_tokens: int
    searches: list[Search]
    resolution: float = 0.0
    # (tokens, model_mb, total_peak_mb) of every fitting trial, per group.
    points: dict[tuple, list[tuple[int, float, float]]] = field(default_factory=dict)

    def step(self, s: Search) -> int:
        """The bracket width at which `s` is done, a multiple of the granularity.

        Args:
            s: one of `searches`.

        Returns:
            The width in tokens.
        """
        g = self.granularity
        return max(g, int(self.resolution * s.lo) // g * g)

    def done(self, s: Search) -> bool:
        """Whether `s` needs no more trials: it failed, or its bracket is narrow enough.

        Args:
            s: one of `searches`.

        Returns:
            True when done.
        """
        return s.error is not None or self._hi(s) - s.lo <= self.step(s)

    def _hi(self, s: Search) -> int:
        # A trial too slow to finish bounds the search too: not a memory limit, but
        # nothing longer can be measured within the timeout either.
        bounds = (s.hi, s.slow, self.max_tokens + self.granularity)
        return min(bound for bound in bounds if bound is not None)

    def converged(self, s: Search) -> bool:
        """Done, and bracketed by an out-of-memory trial (or --max-tokens), not a timeout.

        Args:
            s: one of `searches`.

        Returns:
            True when the bracket says where memory runs out.
        """
        return self.done(s) and s.error is None and (s.slow is None or self._hi(s) < s.slow)

    def probe(self, s: Search) -> int | None:
        """The next length to try for `s`.

        Args:
            s: one of `searches`.

        Returns:
            A multiple of the granularity, or None when `s` must wait or is done.
        """
        if s.busy or self.done(s):
            return None
        # Until a search has its own trials, the other mixtures' (same model and impl) guide
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
        """The lowest limit the other mixtures' trials predict for `s`'s cap, less a margin."""
        setup = tuple(s.setup.values())
        guesses = [
            self._predict(points, s.cap_gb)
            for (model, loss, *other), points in self.points.items()
            if model == s.model and tuple(other) == setup and loss != s.loss
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
        """Narrow the brackets of `s`, and of the searches its trial tells about, by a trial.

        Args:
            s: the search whose trial ran.
            row: the trial's row (`benchmarks.context_trial.run_trial`'s, or an error row).
        """
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
                # too big for every mixture and impl of its backend under it.
                same_build = (other.model, other.backend) == (s.model, s.backend)
                related = same_build if too_big else other.group == s.group
                if related and other.cap_gb <= s.cap_gb:
                    bound = self.granularity if too_big else tokens
                    other.hi = bound if other.hi is None else min(other.hi, bound)
                    other.model_too_big = other.model_too_big or too_big
        elif row.get("status") == "timeout":
            s.slow = tokens if s.slow is None else min(s.slow, tokens)
        else:
            s.error = row.get("error", "no status")

    def resume(self, rows: list[dict[str, Any]]) -> None:
        """Seed the brackets with the rows of an earlier search (`search_row`'s), as if
        their trials had run here; rows of other searches are ignored, failed ones retried.

        Args:
            rows: the earlier rows, their `loss` in today's text form (`earlier_rows`).
        """
        earlier = {row_key(r): r for r in rows}
        for s in self.searches:
            row = earlier.get(s.key)
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


def earlier_rows(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """`--resume`'s rows, refused when they were searched on another card or setup.

    Rows written with the older `a:0.6+b:0.4` text form of a mixture are read too; their
    `loss` comes back in today's form, so they match this run's searches and are written
    again in it. Rows without the setup keys get `EARLIER_SETUP`'s values, what their
    trials ran with.

    Args:
        args: the parsed `benchmarks.max_context` flags (resume, models, layers,
            granularity, resume_if_same_card).
        device: the device this run searches on.

    Returns:
        The rows; none (with a printed note) when they come from another card or setup
        and `--resume-if-same-card` is given.

    Raises:
        SystemExit: the file is not JSON, names an unknown loss, or comes from another
            card or setup without `--resume-if-same-card`.
    """
    try:
        rows = json.loads(args.resume.read_text())
    except json.JSONDecodeError as error:
        raise SystemExit(f"--resume {args.resume} is not a JSON file of rows: {error}") from error
    here = {"device": common.device_name(device), "granularity": args.granularity}
    for row in rows:
        for key, value in EARLIER_SETUP.items():
            row.setdefault(key, value)
        if isinstance(row.get("loss"), str):
            try:
                row["loss"] = common.read_losses_label(row["loss"])
            except ValueError as error:
                raise SystemExit(f"--resume {args.resume}: {error}") from None
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


def search_row(
    s: Search, searcher: Searcher, device: torch.device, args: argparse.Namespace
) -> dict[str, Any]:
    """The result row of one search, as written to `--out` and read back by `--resume`.

    Args:
        s: the search.
        searcher: the searcher that ran it (it judges convergence).
        device: the device searched on.
        args: the parsed `benchmarks.max_context` flags (layers, granularity,
            resolution, jobs, max_tokens).

    Returns:
        The row: `tokens` the longest length that trained, `oom_tokens` the shortest that
        ran out of memory, `timeout_tokens` the shortest that ran past the trial timeout,
        and the figures of this cap's own longest fitting trial.
    """
    spec = MODELS[s.model]
    row = dict(
        impl=s.impl,
        loss=s.loss,
        tokens=s.lo,
        **{key: value for key, value in s.setup.items() if key != "impl"},
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
