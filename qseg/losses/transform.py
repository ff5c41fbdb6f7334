"""Scaled and soft-capped logits: z = c·tanh(s·(h Wᵀ + b) / c), and their chain rule.

Some models do not predict with the head's product itself: Cohere multiplies it by a
constant, Granite divides it by one, Gemma 2 soft-caps it. Every loss term then has to
see the logits the model predicts with, and their gradient has to pass back through
the map: dz_raw = dz · s · (1 − tanh²) = dz · s · (1 − (z / c)²), a function of the
transformed logit z alone, so nothing beyond the logits themselves is kept.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

# Columns of a chunk handled at a time when a cap's derivative needs a temporary: it
# then holds at most this many entries, and at most this fraction of the chunk, instead
# of a second (chunk, V) buffer.
CAP_BLOCK_ENTRIES = 1 << 20
CAP_BLOCK_FRACTION = 16


def transform_logits(
    logits: Tensor, *, logit_softcap: float | None = None, logit_scale: float | None = None
) -> Tensor:
    """The logits a model predicts with from its head's product, as the losses form them.

    Args:
        logits: (..., V) the head's output h Wᵀ + b.
        logit_softcap: c > 0, or None: cap to c·tanh(z / c) after the scale.
        logit_scale: s > 0, or None: multiply by s first.

    Returns:
        (..., V), differentiable; `logits` itself when both are None.
    """
    return LogitTransform.checked(logit_softcap, logit_scale).apply(logits)


@dataclass(frozen=True)
class LogitTransform:
    """The map from the head's product to the model's logits.

    Attributes:
        scale: s, multiplies the product (1.0: none).
        softcap: c, the cap of c·tanh(z / c) applied after the scale (None: none).
    """

    scale: float = 1.0
    softcap: float | None = None

    @classmethod
    def checked(cls, logit_softcap: Any, logit_scale: Any) -> LogitTransform:
        """The transform of `fused_linear_loss`'s options, or ValueError."""
        for name, value in (("logit_softcap", logit_softcap), ("logit_scale", logit_scale)):
            if value is None:
                continue
            real = isinstance(value, numbers.Real) and not isinstance(value, bool)
            if not real or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be None or a finite number > 0; got {value!r}")
        scale = 1.0 if logit_scale is None else float(logit_scale)
        return cls(scale, None if logit_softcap is None else float(logit_softcap))

    @property
    def is_identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None

    def apply(self, logits: Tensor) -> Tensor:
        """The transformed logits, out of place and differentiable (the full-logits path)."""
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def apply_(self, logits: Tensor, dtype: torch.dtype) -> Tensor:
        """A chunk's raw (chunk, V) logits transformed, in place once in `dtype`."""
        if self.is_identity:
            return logits
        logits = logits.to(dtype)
        if self.scale != 1.0:
            logits.mul_(self.scale)
        if self.softcap is not None:
            logits.div_(self.softcap).tanh_().mul_(self.softcap)
        return logits

    def factor(self, z: Tensor) -> Tensor | float:
        """dz / dz_raw at transformed logits z (any shape): s · (1 − (z / c)²), or s."""
        if self.softcap is None:
            return self.scale
        return (1 - (z / self.softcap).square()) * self.scale

    def softmax_grad_(
        self, logits: Tensor, origin: Tensor, coef: Tensor, shift: Tensor | None, kernel
    ) -> None:
        """logits ← (coef_t · exp(z − origin_t) + shift_t) · dz/dz_raw, in place.

        Args:
            logits: (chunk, V) transformed logits z, overwritten with the raw logits'
                gradient of the softmax part (the caller adds its columns' terms).
            origin: (chunk,) the exponent's origin (a log-sum-exp).
            coef: (chunk,) the exponential's factor.
            shift: (chunk,) a term every column gets, or None.
            kernel: the engine's `scaled_softmax_` (used when there is no cap).
        """
        if self.softcap is None:
            kernel(logits, origin, coef * self.scale if self.scale != 1.0 else coef)
            if shift is not None:
                logits.add_((shift * self.scale)[:, None].to(logits.dtype))
            return
        vocab = logits.shape[1]
        cols = min(CAP_BLOCK_ENTRIES // max(1, logits.shape[0]), -(-vocab // CAP_BLOCK_FRACTION))
        cols = max(1, cols)
        for start in range(0, logits.shape[1], cols):
            block = logits[:, start : start + cols]
            grad_factor = self.factor(block)
            block.sub_(origin[:, None]).exp_().mul_(coef[:, None])
            if shift is not None:
                block.add_(shift[:, None])
            block.mul_(grad_factor)
