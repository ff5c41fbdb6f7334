"""The setups of the longest-context search: which backend runs which impl, which of
them can run here, and the figures that compare one setup's rows with another's.

A setup is a dict of `SETUP_KEYS`: backend, impl, lora_r,
offload_activations; `benchmarks.max_context` makes one search (or trial) per setup,
mixture and cap.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
from typing import Any

import torch

from benchmarks import common
from benchmarks.context_models import MODELS, WEIGHTS

# A trial's setup besides its model, losses and cap: rows name each of these keys.
SETUP_KEYS = ("backend", "impl", "lora_r", "offload_activations")
# What every trial ran with before rows named their setup (the transformers backend,
# qseg's default LoRA r, checkpointed activations kept on the GPU): rows read without
# these keys get them.
EARLIER_SETUP = {"backend": "transformers", "lora_r": 8, "offload_activations": False}


def row_key(row: dict[str, Any]) -> tuple:
    """What identifies a search in its rows: (model, loss, cap_gb, *setup).

    Args:
        row: a result row, or an earlier one without the setup keys (`EARLIER_SETUP`).

    Returns:
        The key; equal to `Search.key` of the search that wrote the row.
    """
    row = {**EARLIER_SETUP, **row}
    return (row.get("model"), row.get("loss"), row.get("cap_gb"), *(row[k] for k in SETUP_KEYS))


# The impls each backend runs: full logits are what unsloth's path exists to avoid, and
# unsloth's own loss needs its model.
BACKEND_IMPLS = {"transformers": ("qseg", "naive"), "unsloth": ("qseg", "unsloth")}
IMPLS = ("qseg", "naive", "unsloth")
UNSLOTH_LOSS = "cross_entropy"  # the one loss unsloth's own path computes


def runnable(args: argparse.Namespace, device: torch.device) -> list[tuple[str, dict]]:
    """(loss, setup) of every search or trial asked for that can run here.

    Args:
        args: the parsed flags.
        device: the device of the run.

    Returns:
        The pairs; a setup is a dict of `SETUP_KEYS`.
    """
    if unsloth_missing(device) is not None:
        return [pair for pair in asked(args) if pair[1]["backend"] != "unsloth"]
    return asked(args)


def asked(args: argparse.Namespace) -> list[tuple[str, dict]]:
    """(loss, setup) of every (backend, impl, LoRA r) asked for; unsloth's own path with
    cross-entropy only."""
    pairs = []
    for backend, impl, lora_r in itertools.product(args.backends, args.impls, args.lora_r):
        if impl not in BACKEND_IMPLS[backend]:
            continue
        # unsloth's checkpointing offloads whatever the flag says.
        offload = backend == "unsloth" or args.offload_activations
        setup = dict(backend=backend, impl=impl, lora_r=lora_r, offload_activations=offload)
        pairs += [(loss, setup) for loss in ([UNSLOTH_LOSS] if impl == "unsloth" else args.mixes)]
    return pairs


def unsloth_missing(device: torch.device) -> str | None:
    """Why unsloth cannot run here, or None: it is found and a CUDA GPU is used. Not
    imported here: it patches transformers in the process that imports it."""
    if device.type != "cuda":
        return "unsloth needs a CUDA GPU; this run is on the CPU"
    if importlib.util.find_spec("unsloth") is None:
        return "unsloth is not installed (pip install 'qseg[unsloth]')"
    return None


def unsloth_rows(args: argparse.Namespace, device: torch.device, reason: str) -> list[dict]:
    """Skipped rows for the unsloth setups asked for, one per (model, mixture, setup, and
    length of `--tokens`; a search's: `tokens` 0, none trained).

    Args:
        args: the parsed flags.
        device: the device of the run.
        reason: why unsloth cannot run here.

    Returns:
        The rows.
    """
    rows = []
    for model, (loss, setup), tokens in itertools.product(
        args.models, asked(args), args.tokens or [0]
    ):
        if setup["backend"] != "unsloth":
            continue
        spec = MODELS[model]
        case = dict(loss=loss, tokens=tokens, vocab=spec["vocab_size"], dtype=WEIGHTS)
        row = common.skipped_row({**case, "hidden": spec["hidden_size"]}, reason)
        rows.append({**row, **setup, "device": common.device_name(device), "model": model})
    return rows


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Add vs_naive (tokens / naive's: same mixture and setup, on transformers), vs_ce
    (tokens / cross-entropy's, same setup) and vs_unsloth (tokens / unsloth's own path's,
    same LoRA r) to the measured rows of a cap.

    Args:
        rows: changed in place.
    """

    def key(row: dict[str, Any], **change: Any) -> tuple:
        return row_key({**EARLIER_SETUP, **row, **change})

    found = {key(r): r for r in rows if common.measured(r)}
    refs = {
        "vs_naive": dict(backend="transformers", impl="naive"),
        "vs_ce": dict(loss="cross_entropy"),
        "vs_unsloth": dict(
            backend="unsloth", impl="unsloth", loss=UNSLOTH_LOSS, offload_activations=True
        ),
    }
    for row in rows:
        if not common.measured(row) or not row["tokens"] or row.get("cap_gb") is None:
            continue
        for name, change in refs.items():
            ref = found.get(key(row, **change))
            if ref is not None and ref is not row and ref["tokens"]:
                row[name] = row["tokens"] / ref["tokens"]
