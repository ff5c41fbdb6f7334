"""A mixture's value from the small per-token inputs, in the reduction asked for.

Both entry points end here: the chunked engine and the full-logits path produce the
same `TokenInputs` and `ClassStats`, so the two cannot drift apart.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import engine, functional
from .inputs import ValidTokens
from .registry import split_by_kind


def combine(
    mixture: dict[str, dict[str, Any]],
    tokens: ValidTokens,
    inputs: functional.TokenInputs,
    stats: functional.ClassStats | None,
    reduction: str,
    token_weights: Tensor | None,
    num_tokens: int | None,
    num_samples: int | None,
    labels_shape: torch.Size,
) -> Tensor:
    """Σ weight · loss; the normalizers default to this batch's.

    Args:
        inputs: the valid tokens' `TokenInputs`, each (n,).
        stats: the region terms' `ClassStats`, or None for token-wise terms only.
        token_weights: (n,) the valid tokens' weights, or None.
        labels_shape: the labels' shape, for reduction "none".

    Returns:
        0-dim for "mean" and "sum"; for "none" the token-wise terms (labels_shape), 0 at
        ignored positions, or the region terms per sample (B,), 0 for samples without a
        valid token.
    """
    token_part, region_part = split_by_kind(mixture)
    logp = inputs.logp
    if reduction == "none":
        if token_part:
            per_token = _weighted(functional.weighted_token_loss(token_part)(inputs), token_weights)
            flat = logp.new_zeros(labels_shape.numel()).index_add(0, tokens.index, per_token)
            return flat.view(labels_shape)
        per_sample = functional.region_loss(region_part, stats, reduction="none")
        return logp.new_zeros(tokens.batch).index_add(0, tokens.sample_ids, per_sample)
    loss = logp.new_zeros(())
    if token_part:
        per_token = _weighted(functional.weighted_token_loss(token_part)(inputs), token_weights)
        count = logp.shape[0] if num_tokens is None else num_tokens
        loss = loss + (per_token.sum() / count if reduction == "mean" else per_token.sum())
    if region_part:
        share = 1.0 if num_samples is None else tokens.num_samples / num_samples
        loss = loss + functional.region_loss(region_part, stats, share, reduction)
    return loss


def _weighted(per_token: Tensor, token_weights: Tensor | None) -> Tensor:
    return per_token if token_weights is None else per_token * token_weights


def zero_loss(shape: tuple[int, ...], *inputs: Tensor | None) -> Tensor:
    """Zeros of `shape`, connected to every input that requires grad, so backward gives
    zero gradients."""
    dtype = engine.accumulation_dtype(*inputs)
    zero = torch.zeros(shape, dtype=dtype, device=inputs[0].device)
    for t in inputs:
        if t is not None and t.requires_grad:
            zero = zero + t.reshape(-1)[:0].sum().to(dtype)
    return zero


def empty_shape(
    mixture: dict[str, dict[str, Any]], reduction: str, labels: Tensor
) -> tuple[int, ...]:
    """The result's shape (see `combine`) for a call with no valid token."""
    if reduction != "none":
        return ()
    if split_by_kind(mixture)[0]:
        return tuple(labels.shape)
    return (labels.shape[0] if labels.dim() > 1 else 1,)


def class_stats(
    logp: Tensor, target: Tensor, tokens: ValidTokens, with_rest: bool
) -> functional.ClassStats:
    """From (n, k) column log-probabilities, plus the rest's as column k `with_rest`."""
    k = logp.shape[1] - with_rest
    rest = logp[:, k] if with_rest else None
    return functional.ClassStats(logp[:, :k], target, tokens.sample, tokens.num_samples, rest)
