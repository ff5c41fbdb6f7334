"""What a fused pass can report besides the loss: scored tokens, argmax hits, entropy.

Read off each chunk's logits while they exist, without gradient, so that a trainer can
log token accuracy and predictive entropy without ever holding the full logits.
"""

from __future__ import annotations

import torch
from torch import Tensor


class TokenStats:
    """Each scored row's predictive entropy and whether its label is the row's argmax.

    Attributes:
        labels: (n,) the scored rows' labels.
        entropy: (n,) −Σ_v p_v log p_v of each row, in the accumulation dtype.
        correct: (n,) bool, the label is the row's argmax.
    """

    def __init__(self, labels: Tensor, dtype: torch.dtype):
        self.labels = labels
        self.entropy = torch.zeros(labels.shape[0], dtype=dtype, device=labels.device)
        self.correct = torch.zeros(labels.shape[0], dtype=torch.bool, device=labels.device)

    @torch.no_grad()
    def add(self, rows: slice, logits: Tensor, lse: Tensor | None = None) -> None:
        """Record a chunk's rows from its (chunk, V) logits, left unchanged, and their
        (chunk,) log-sum-exp (computed here when None)."""
        dtype = self.entropy.dtype
        z = logits.to(dtype)
        if lse is None:
            lse = torch.logsumexp(z, dim=1)
        # entropy = lse − Σ_v p_v z_v; one (chunk, V) temporary, as the log-sum-exp takes
        weighted = (z - lse[:, None]).exp_().mul_(z)
        self.entropy[rows] = lse - weighted.sum(1)
        self.correct[rows] = logits.argmax(1) == self.labels[rows]

    def summary(self) -> dict[str, Tensor]:
        """{"tokens", "correct"}: 0-dim long counts; {"entropy"}: 0-dim mean (0 for none)."""
        tokens = self.labels.new_tensor(self.labels.shape[0])
        entropy = self.entropy.sum() / max(1, self.labels.shape[0])
        return {"tokens": tokens, "correct": self.correct.sum(), "entropy": entropy}
