"""Every loss from full logits: the reference the chunked path is tested against, and the
way to score logits a caller already holds."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import engine, functional
from .api import ValidTokens, _check_shapes, _class_stats, _mixture_loss, _normalizers, _zero_loss
from .registry import normalize_losses, split_by_kind


def loss_from_logits(
    logits: Tensor,
    labels: Tensor,
    losses: str | dict,
    *,
    ignore_index: int = -100,
    num_tokens: int | None = None,
    num_samples: int | None = None,
) -> Tensor:
    """The same losses from full logits (B, T, V) the caller already holds.

    Half-precision logits are upcast to float32. See `fused_linear_loss` for the rest.
    """
    losses = normalize_losses(losses)
    _check_shapes(logits, labels, "logits")
    vocab = logits.shape[-1]
    tokens = ValidTokens.select(labels, vocab, ignore_index)
    num_tokens, num_samples = _normalizers(num_tokens, num_samples, tokens)
    if tokens.index.numel() == 0:
        return _zero_loss(logits)
    with torch.autocast(logits.device.type, enabled=False):
        return _losses_from_logits(logits, tokens, losses, num_tokens, num_samples)


def _losses_from_logits(
    logits: Tensor,
    tokens: ValidTokens,
    losses: dict[str, dict[str, Any]],
    num_tokens: int | None,
    num_samples: int | None,
) -> Tensor:
    vocab = logits.shape[-1]
    dtype = engine.accumulation_dtype(logits)
    z = logits.reshape(-1, vocab).index_select(0, tokens.index).to(dtype)
    lse = torch.logsumexp(z, dim=1, keepdim=True)
    if not split_by_kind(losses)[1]:
        label_logp = z.gather(1, tokens.labels[:, None]).squeeze(1) - lse.squeeze(1)
        return _mixture_loss(losses, tokens, label_logp, None, num_tokens, num_samples)
    classes, target = torch.unique(tokens.labels, return_inverse=True)
    logp = z.index_select(1, classes) - lse
    with_rest = functional.needs_rest(losses)
    if with_rest:
        logp = torch.cat([logp, _rest_logsumexp(z, classes) - lse], dim=1)
    stats = _class_stats(logp, target, tokens, with_rest)
    return _mixture_loss(losses, tokens, stats.label_logp(), stats, num_tokens, num_samples)


def _rest_logsumexp(z: Tensor, classes: Tensor) -> Tensor:
    """(n, 1) log Σ_{c ∉ classes} exp(z_c); −inf, with a zero gradient, where no such class
    has a finite logit (logsumexp's gradient over only −inf is NaN)."""
    rest = z.index_fill(1, classes, float("-inf"))
    some = rest.amax(1, keepdim=True) > float("-inf")
    lse = torch.logsumexp(torch.where(some, rest, 0), dim=1, keepdim=True)
    return torch.where(some, lse, float("-inf"))
