"""The checks both entry points make on their inputs, and the valid tokens they pick.

Everything a user can get wrong is refused here, before any work, with a message that
says what is allowed.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .registry import split_by_kind

REDUCTIONS = ("mean", "sum", "none")


@dataclass
class ValidTokens:
    """The positions that take part in the loss, flattened.

    Attributes:
        index: (n,) positions in the flattened (B·T) input.
        labels: (n,) their labels.
        sample: (n,) their sample, renumbered 0..S-1 over samples with a valid token.
        num_samples: S.
        sample_ids: (S,) the original sample (0..B-1) of each renumbered one.
        batch: B, the samples given (1 for labels of one dimension).
    """

    index: Tensor
    labels: Tensor
    sample: Tensor
    num_samples: int
    sample_ids: Tensor
    batch: int

    @classmethod
    def select(cls, labels: Tensor, vocab: int, ignore_index: int) -> ValidTokens:
        if not is_int(ignore_index):
            raise ValueError(f"ignore_index must be an int (default -100); got {ignore_index!r}")
        if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
            raise ValueError(f"labels must be an integer tensor (torch.long); got {labels.dtype}")
        per_sample = labels.flatten(1) if labels.dim() > 1 else labels[None]
        flat = per_sample.reshape(-1)
        index = (flat != ignore_index).nonzero().squeeze(1)
        valid = flat[index]
        bad = (valid < 0) | (valid >= vocab)
        if bad.any():
            raise ValueError(
                f"labels must be in [0, {vocab}) (the vocabulary size) or ignore_index="
                f"{ignore_index}; found {valid[bad][0].item()}"
            )
        samples, sample = torch.unique(index // per_sample.shape[1], return_inverse=True)
        return cls(index, valid.long(), sample, samples.numel(), samples, per_sample.shape[0])


def is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_shapes(features: Tensor, labels: Tensor, what: str) -> None:
    for name, value in ((what, features), ("labels", labels)):
        if not isinstance(value, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor; got {type(value).__name__}")
    if not features.is_floating_point():
        raise ValueError(f"{what} must be a floating-point tensor; got {features.dtype}")
    if features.dim() < 2 or features.shape[:-1] != labels.shape:
        raise ValueError(
            f"{what} of shape {tuple(features.shape)} does not line up with labels of shape "
            f"{tuple(labels.shape)}: expected {what} (*labels.shape, {what[0]}) with labels "
            f"(B, T) already aligned (no shift happens inside)"
        )


def check_options(
    mixture: dict[str, dict[str, Any]],
    reduction: Any,
    token_weights: Any,
    labels: Tensor,
    num_tokens: Any,
    num_samples: Any,
) -> None:
    """`reduction` and `token_weights` checked against the mixture and the labels."""
    token_part, region_part = split_by_kind(mixture)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}; got {reduction!r}")
    if reduction != "mean" and (num_tokens is not None or num_samples is not None):
        raise ValueError(
            f"num_tokens and num_samples set the divisors of reduction='mean'; with "
            f"reduction={reduction!r} leave them None"
        )
    if reduction == "none":
        if token_part and region_part:
            raise ValueError(
                "reduction='none' gives token-wise terms per position and region terms per "
                f"sample, so it takes one kind at a time; got token-wise {list(token_part)} "
                f"with region {list(region_part)}: compute them in two calls"
            )
        if not region_part.get("lovasz", {}).get("per_sample", True):
            raise ValueError(
                "reduction='none' gives region terms per sample; lovasz with "
                "per_sample=False scores the whole batch as one group: set per_sample=True"
            )
    if token_weights is None:
        return
    if region_part:
        raise ValueError(
            f"token_weights weigh token-wise terms; the region terms {list(region_part)} are "
            "not sums over tokens: use token-wise losses only with token_weights"
        )
    if not isinstance(token_weights, Tensor) or token_weights.shape != labels.shape:
        got = tuple(token_weights.shape) if isinstance(token_weights, Tensor) else token_weights
        raise ValueError(
            f"token_weights must be a tensor of the labels' shape {tuple(labels.shape)}; "
            f"got {got!r}"
        )
    if not token_weights.is_floating_point():
        raise ValueError(f"token_weights must be floating-point; got {token_weights.dtype}")
    if not bool(torch.isfinite(token_weights).all()) or bool((token_weights < 0).any()):
        raise ValueError("token_weights must be finite and >= 0 everywhere")


def normalizers(
    num_tokens: Any, num_samples: Any, tokens: ValidTokens
) -> tuple[int | None, int | None]:
    """`num_tokens` and `num_samples` checked: they count the whole accumulated batch
    (across processes too), so at least this batch's valid tokens and samples."""
    samples = "samples with a valid token"
    return (
        _checked_count("num_tokens", num_tokens, tokens.index.numel(), "valid tokens"),
        _checked_count("num_samples", num_samples, tokens.num_samples, samples),
    )


def _checked_count(name: str, value: Any, here: int, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = value.item()
    if not is_int(value) or value < here:
        raise ValueError(
            f"{name} must be None or an int at least the {here} {what} here (it counts those "
            f"of the whole accumulated batch); got {value!r}"
        )
    return int(value)
