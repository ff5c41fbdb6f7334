"""Segmentation and token-wise losses for language models, chunked over the vocabulary.

    from qseg.losses import fused_linear_loss
    loss = fused_linear_loss(hidden, model.lm_head, labels, {"cross_entropy": 0.6, "lovasz": 0.4})

The contract (math, names, shapes) is `docs/losses.md`; `functional` holds the
math, `engine` the chunked passes over the head, `autotune` the chunk sizing.
"""

from .api import FusedLinearLoss, fused_linear_loss
from .autotune import ChunkPlan, default_budget, plan_chunks
from .logits import loss_from_logits
from .observe import observe_chunks
from .registry import available_losses, canonical_name, loss_kind, normalize_losses
from .transform import transform_logits

__all__ = [
    "ChunkPlan",
    "FusedLinearLoss",
    "available_losses",
    "canonical_name",
    "default_budget",
    "fused_linear_loss",
    "loss_from_logits",
    "loss_kind",
    "normalize_losses",
    "observe_chunks",
    "plan_chunks",
    "transform_logits",
]
