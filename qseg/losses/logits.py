"""Every loss from full logits: the reference the chunked path is tested against, and the
way to score logits a caller already holds."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import engine, functional
from .inputs import ValidTokens, check_options, check_shapes, normalizers
from .mixture import class_stats, combine, empty_shape, zero_loss
from .registry import normalize_losses, split_by_kind
from .stats import TokenStats
from .transform import LogitTransform


def loss_from_logits(
    logits: Tensor,
    labels: Tensor,
    losses: str | dict,
    *,
    ignore_index: int = -100,
    num_tokens: int | None = None,
    num_samples: int | None = None,
    logit_softcap: float | None = None,
    logit_scale: float | None = None,
    reduction: str = "mean",
    token_weights: Tensor | None = None,
    return_stats: bool = False,
) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """The same losses from full logits (B, T, V) the caller already holds.

    `logit_scale` and `logit_softcap` transform the given logits as `fused_linear_loss`
    transforms the head's product (give them only for raw, untransformed logits).
    Half-precision logits are upcast to float32. See `fused_linear_loss` for the rest.
    """
    losses = normalize_losses(losses)
    transform = LogitTransform.checked(logit_softcap, logit_scale)
    check_shapes(logits, labels, "logits")
    check_options(losses, reduction, token_weights, labels, num_tokens, num_samples)
    vocab = logits.shape[-1]
    tokens = ValidTokens.select(labels, vocab, ignore_index)
    num_tokens, num_samples = normalizers(num_tokens, num_samples, tokens)
    dtype = engine.accumulation_dtype(logits)
    stats = TokenStats(tokens.labels, dtype) if return_stats else None
    if tokens.index.numel() == 0:
        loss = zero_loss(empty_shape(losses, reduction, labels), logits)
    else:
        weights = None
        if token_weights is not None:
            weights = token_weights.reshape(-1)[tokens.index].to(dtype)
        with torch.autocast(logits.device.type, enabled=False):
            z = transform.apply(logits.reshape(-1, vocab).index_select(0, tokens.index).to(dtype))
            if stats is not None:
                stats.add(slice(None), z.detach())
            loss = combine(
                losses, tokens, *_inputs(z, tokens, losses), reduction, weights,
                num_tokens, num_samples, labels.shape,
            )  # fmt: skip
    return (loss, stats.summary()) if return_stats else loss


def _inputs(
    z: Tensor, tokens: ValidTokens, losses: dict[str, dict[str, Any]]
) -> tuple[functional.TokenInputs, functional.ClassStats | None]:
    """The valid rows' (n, V) logits z reduced to what `combine` takes."""
    token_part, region_part = split_by_kind(losses)
    lse = torch.logsumexp(z, dim=1, keepdim=True)
    needs_lse, needs_mean = functional.token_needs(token_part)
    row_lse = lse.squeeze(1) if needs_lse else None
    mean = z.mean(1) if needs_mean else None
    if not region_part:
        label_logp = z.gather(1, tokens.labels[:, None]).squeeze(1) - lse.squeeze(1)
        return functional.TokenInputs(label_logp, row_lse, mean), None
    classes, target = torch.unique(tokens.labels, return_inverse=True)
    logp = z.index_select(1, classes) - lse
    with_rest = functional.needs_rest(region_part)
    if with_rest:
        logp = torch.cat([logp, _rest_logsumexp(z, classes) - lse], dim=1)
    stats = class_stats(logp, target, tokens, with_rest)
    return functional.TokenInputs(stats.label_logp(), row_lse, mean), stats


def _rest_logsumexp(z: Tensor, classes: Tensor) -> Tensor:
    """(n, 1) log Σ_{c ∉ classes} exp(z_c); −inf, with a zero gradient, where no such class
    has a finite logit (logsumexp's gradient over only −inf is NaN)."""
    rest = z.index_fill(1, classes, float("-inf"))
    some = rest.amax(1, keepdim=True) > float("-inf")
    lse = torch.logsumexp(torch.where(some, rest, 0), dim=1, keepdim=True)
    return torch.where(some, lse, float("-inf"))
