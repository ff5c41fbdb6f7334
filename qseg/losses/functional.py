"""The math of every loss, written once, on small tensors.

Nothing here sees the vocabulary. Token-wise losses take each valid token's
log-probability of its label; region losses take `ClassStats`, the log-probabilities
of the classes present in the batch. The chunked engine and the full-logits path both
produce these inputs and share this code, so the two cannot drift apart.

Notation follows `docs/losses.md`: for sample b and class c, n_bc is the label
count, P_bc = Σ_t p_t(c) the soft count and I_bc = Σ_{t: y_t = c} p_t(c) the soft overlap,
all over the sample's valid tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from torch import Tensor

# --------------------------------------------------------------------------- token-wise


@dataclass
class TokenInputs:
    """What token-wise losses see of each valid token t: its label's log-probability and,
    where a term needs them (`token_needs`), its row's log-sum-exp and mean logit.

    Attributes:
        logp: (n,) log p_t(y_t).
        lse: (n,) log Σ_v exp(z_tv), or None.
        mean_logit: (n,) Σ_v z_tv / V, or None.
    """

    logp: Tensor
    lse: Tensor | None = None
    mean_logit: Tensor | None = None


# Each maps TokenInputs of n tokens to (n,) losses.


def cross_entropy(t: TokenInputs, label_smoothing: float = 0.0) -> Tensor:
    """(1 − ε)·(−log p_t) + ε·(−mean_v log p_tv), as torch's cross_entropy defines
    label smoothing over the whole vocabulary; −mean_v log p_tv = lse_t − mean_v z_tv."""
    nll = -t.logp
    if not label_smoothing:
        return nll
    return (1 - label_smoothing) * nll + label_smoothing * (t.lse - t.mean_logit)


def focal(t: TokenInputs, gamma: float) -> Tensor:
    """−(1 − p_t)^γ · log p_t (Lin et al. 2017)."""
    return -torch.pow(_one_minus(t.logp), gamma) * t.logp


def self_adjusting_dice(t: TokenInputs, alpha: float, gamma: float) -> Tensor:
    """1 − (2q + γ) / (q + 1 + γ) with q = (1 − p_t)^α · p_t (Li et al. 2020)."""
    q = torch.pow(_one_minus(t.logp), alpha) * t.logp.exp()
    return 1 - (2 * q + gamma) / (q + 1 + gamma)


def z_loss(t: TokenInputs) -> Tensor:
    """lse_t², which keeps the log-partition near 0 (PaLM's auxiliary loss)."""
    return t.lse.square()


def _one_minus(logp: Tensor) -> Tensor:
    """1 − p from log p. −expm1(log p) keeps its precision when p is close to 1; the floor
    (the dtype's smallest normal number) keeps (1 − p)^γ differentiable for γ < 1 where p
    rounds to 1: there the gradient of 0^γ is infinite and times log p = 0 gives NaN,
    while the true gradient of the loss tends to 0."""
    return (-torch.expm1(logp)).clamp_min(torch.finfo(logp.dtype).tiny)


TOKEN_LOSSES: dict[str, Callable[..., Tensor]] = {
    "cross_entropy": cross_entropy,
    "focal": focal,
    "self_adjusting_dice": self_adjusting_dice,
    "z_loss": z_loss,
}


def token_needs(mixture: dict[str, dict[str, Any]]) -> tuple[bool, bool]:
    """Whether the token-wise terms need (lse, mean_logit) in `TokenInputs`."""
    smoothing = mixture.get("cross_entropy", {}).get("label_smoothing", 0.0) > 0
    return smoothing or "z_loss" in mixture, smoothing


def weighted_token_loss(mixture: dict[str, dict[str, Any]]) -> Callable[[TokenInputs], Tensor]:
    """The per-token loss Σ_i w_i · f_i(t) of the token-wise part of a mixture."""

    def per_token(t: TokenInputs) -> Tensor:
        total = torch.zeros_like(t.logp)
        for name, params in mixture.items():
            kwargs = {k: v for k, v in params.items() if k != "weight"}
            total = total + params["weight"] * TOKEN_LOSSES[name](t, **kwargs)
        return total

    return per_token


# --------------------------------------------------------------------------- region


@dataclass
class ClassStats:
    """What region losses need about a batch, restricted to its valid tokens.

    Attributes:
        logp: (n, k) log p_t(c) of each valid token t for each class c present in the
            batch (k classes, in the order of `torch.unique` of the labels).
        target: (n,) long, the column of each token's label in `logp`.
        sample: (n,) long, the sample of each token, renumbered 0..S-1 over the samples
            that have at least one valid token.
        num_samples: S.
        rest_logp: (n,) log Σ_c p_t(c) over the classes absent from the whole batch, where
            a loss needs it (`needs_rest`), else None.
    """

    logp: Tensor
    target: Tensor
    sample: Tensor
    num_samples: int
    rest_logp: Tensor | None = None

    @cached_property
    def counts(self) -> Tensor:
        """(S, k) n_bc, the label count of each class in each sample."""
        flat = self.sample * self.logp.shape[1] + self.target
        counts = torch.bincount(flat, minlength=self.num_samples * self.logp.shape[1])
        return counts.view(self.num_samples, -1).to(self.logp.dtype)

    @cached_property
    def present(self) -> Tensor:
        """(S, k) bool, class c occurs in sample b (c ∈ K_b)."""
        return self.counts > 0

    def absent_soft_counts(self, soft: Tensor) -> Tensor:
        """(S,) Σ_{c∉K_b} P_bc from the soft counts P (S, k), summed directly: the shorter
        |M_b| − Σ_{c∈K_b} P_bc cancels to rounding noise once predictions are confident."""
        outside = soft.new_zeros(self.num_samples).index_add(0, self.sample, self.rest_logp.exp())
        return outside + torch.where(self.present, 0, soft).sum(1)

    def label_logp(self) -> Tensor:
        """(n,) log p_t(y_t)."""
        return self.logp.gather(1, self.target[:, None]).squeeze(1)

    def soft_counts(self) -> tuple[Tensor, Tensor]:
        """(P, I), each (S, k): soft counts P_bc and soft overlaps I_bc."""
        p = self.logp.exp()
        S, k = self.num_samples, p.shape[1]
        soft = p.new_zeros(S, k).index_add(0, self.sample, p)
        p_label = p.gather(1, self.target[:, None]).squeeze(1)
        overlap = p.new_zeros(S * k).index_add(0, self.sample * k + self.target, p_label)
        return soft, overlap.view(S, k)


def tversky(stats: ClassStats, alpha: float, beta: float, smooth: float) -> Tensor:
    """Per-sample Tversky loss (S,): 1 − mean_{c∈K_b} (TP + s) / (TP + α·FP + β·FN + s).

    TP = I_bc, FP = P_bc − I_bc, FN = n_bc − I_bc (Salehi et al. 2017). Dice is
    α = β = 0.5 and Jaccard α = β = 1.
    """
    soft, overlap = stats.soft_counts()
    present = stats.present
    numer = overlap + smooth
    denom = overlap + alpha * (soft - overlap) + beta * (stats.counts - overlap) + smooth
    # Absent classes are masked out; a safe denominator keeps their gradient at 0, not NaN.
    index = numer / torch.where(present, denom, torch.ones_like(denom))
    index = torch.where(present, index, torch.zeros_like(index))
    return 1 - index.sum(1) / present.sum(1)


def dice(stats: ClassStats, smooth: float) -> Tensor:
    """Per-sample soft Dice loss (S,): Tversky with α = β = 0.5."""
    return tversky(stats, 0.5, 0.5, smooth)


def jaccard(stats: ClassStats, smooth: float) -> Tensor:
    """Per-sample soft Jaccard (IoU) loss (S,): Tversky with α = β = 1."""
    return tversky(stats, 1.0, 1.0, smooth)


# The paper's code weights absent classes by 1 / (0 + 1e-10)².
REFERENCE_ABSENT_WEIGHT = 1e20


def generalized_dice(stats: ClassStats, smooth: float, absent_weight: str) -> Tensor:
    """Per-sample Generalized Dice loss (S,) (Sudre et al. 2017), over all V classes.

    L_b = 1 − 2 (Σ_c w_bc I_bc + s) / (Σ_c w_bc (P_bc + n_bc) + s), w_bc = 1 / n_bc² for
    present classes. Absent classes have I = n = 0 and share one weight, so their part of
    the denominator is w_absent · Σ_{c∉K_b} P_bc (`ClassStats.absent_soft_counts`).
    """
    soft, overlap = stats.soft_counts()
    counts, present = stats.counts, stats.present
    weight = torch.where(present, 1 / torch.where(present, counts, 1).square(), 0)
    numer = (weight * overlap).sum(1) + smooth
    denom = (weight * (soft + counts)).sum(1) + smooth
    if absent_weight == "max":
        denom = denom + weight.amax(1) * stats.absent_soft_counts(soft)
    elif absent_weight == "reference":
        denom = denom + REFERENCE_ABSENT_WEIGHT * stats.absent_soft_counts(soft)
    return 1 - 2 * numer / denom


def needs_rest(mixture: dict[str, dict[str, Any]]) -> bool:
    """Whether the mixture needs `ClassStats.rest_logp`: generalized dice weighting
    absent classes."""
    params = mixture.get("generalized_dice")
    return params is not None and params["absent_weight"] != "zero"


def lovasz_per_class(
    prob: Tensor, is_fg: Tensor, with_grad: bool = False
) -> tuple[Tensor, Tensor | None]:
    """Lovász-Softmax loss of each class over one group of tokens (Berman et al. 2018).

    Args:
        prob: (m, k) p_t(c) of the group's m tokens for k classes present in it.
        is_fg: (m, k) bool, y_t = c.
        with_grad: also return the gradient.

    Returns:
        (k,) loss_c = Σ_i e_sorted,i · ΔJ_i, all k classes at once, and with `with_grad`
        the (m, k) d loss_c / d p_t(c), else None.
    """
    k = prob.shape[1]
    diff = is_fg.to(prob.dtype) - prob
    errors = diff.abs()
    # J reaches 1 at the class's last foreground token in the order, so ΔJ is 0 after it:
    # background tokens whose error is below every foreground error of their class carry
    # neither loss nor gradient, in any order among them. Only the others are sorted, a
    # few per class where the dense sort would take every token for every class.
    least_fg = torch.where(is_fg, errors, torch.inf).amin(0)
    token, cls = (is_fg | (errors >= least_fg)).nonzero(as_tuple=True)
    # By class, then by error descending within a class (the order carries no gradient).
    order = errors[token, cls].argsort(descending=True, stable=True)
    order = order[cls[order].argsort(stable=True)]
    token, cls = token[order], cls[order]
    errors_sorted = errors[token, cls]
    fg_sorted = is_fg[token, cls].to(prob.dtype)
    counts = torch.bincount(cls, minlength=k)
    first = counts.cumsum(0) - counts  # each class's first position (every class has one)
    rank = torch.arange(cls.numel(), device=cls.device) - first[cls]
    running_fg = fg_sorted.cumsum(0)
    running_fg = running_fg - (running_fg - fg_sorted)[first][cls]  # within the class
    total_fg = is_fg.sum(0).to(prob.dtype)[cls]
    intersection = total_fg - running_fg
    union = total_fg + (rank + 1) - running_fg
    jaccard_curve = 1 - intersection / union
    delta = jaccard_curve - torch.where(rank == 0, 0, jaccard_curve.roll(1))
    losses = prob.new_zeros(k).index_add_(0, cls, errors_sorted * delta)
    if not with_grad:
        return losses, None
    # For a fixed order loss_c is linear in the errors, e_t's coefficient being ΔJ at its
    # rank; ∂e_t/∂p_t = sign(p_t − fg_t), as autograd through abs gives (0 where equal).
    grad = torch.zeros_like(prob)
    grad[token, cls] = delta * diff[token, cls].sign().neg()
    return losses, grad


# Lovász works on a (tokens, classes) matrix; with many classes (up to one per token) it
# takes blocks of columns of about this many entries.
LOVASZ_BLOCK_ENTRIES = 1 << 22


class LovaszFunction(torch.autograd.Function):
    """Lovász-Softmax losses of groups of tokens, their gradient found in the forward.

    Autograd through the sort would keep, or recompute in the backward, every block's
    (tokens × classes) sort and the steps after it. For a fixed order (it carries no
    gradient) a group's loss is Σ_{t,c} a_tc · p_t(c) locally, a_tc = ΔJ at the rank of
    e_t(c), times sign(p − fg) and 1 / k: so each block is sorted once, in the forward, and
    the backward is a_tc · exp(logp_tc), itself differentiable (a gradient penalty through
    `loss_from_logits` gets the second order autograd would give).

    Inputs: logp (n, K) log p_t(c) of the classes present in the batch, target (n,) the
    column of each token's label, groups: a list of (rows (m,) of the group, or None for
    all n; cols (k,) the group's present classes), row_group (n,) each row's group.
    Output: (G,) each group's mean over its classes of loss_c. The (n, K) coefficients a
    are held from the forward to the backward (as autograd would hold the gradient).
    """

    @staticmethod
    def forward(ctx, logp, target, groups, row_group):
        coef = torch.zeros_like(logp) if ctx.needs_input_grad[0] else None
        losses = []
        for rows, cols in groups:
            group_logp = logp if rows is None else logp.index_select(0, rows)
            group_target = target if rows is None else target.index_select(0, rows)
            step = max(1, LOVASZ_BLOCK_ENTRIES // max(group_logp.shape[0], 1))
            total = logp.new_zeros(())
            for start in range(0, cols.numel(), step):
                block = cols[start : start + step]
                prob = group_logp.index_select(1, block).exp()
                is_fg = group_target[:, None] == block[None, :]
                class_losses, d_prob = lovasz_per_class(prob, is_fg, coef is not None)
                total += class_losses.sum()
                if coef is None:
                    continue
                d_prob = d_prob.div_(cols.numel())
                if rows is None:
                    coef.index_copy_(1, block, d_prob)
                else:
                    coef.index_put_((rows[:, None], block[None, :]), d_prob)
            losses.append(total / cols.numel())
        ctx.save_for_backward(coef, logp, row_group)
        return torch.stack(losses)

    @staticmethod
    def backward(ctx, grad_losses):
        coef, logp, row_group = ctx.saved_tensors
        factor = grad_losses[row_group][:, None]
        if torch.is_grad_enabled():  # create_graph: out of place, so autograd can follow
            return coef * logp.exp() * factor, None, None, None
        return logp.exp().mul_(coef).mul_(factor), None, None, None


def lovasz(stats: ClassStats, per_sample: bool) -> Tensor:
    """Lovász-Softmax losses of the groups (G,): the batch as one group, or each sample.

    A group's loss is the mean of `lovasz_per_class` over the classes present in it.
    """
    if not per_sample:
        cols = torch.arange(stats.logp.shape[1], device=stats.logp.device)
        groups = [(None, cols)]
        row_group = torch.zeros_like(stats.target)
    else:
        groups = [
            ((stats.sample == b).nonzero().squeeze(1), stats.present[b].nonzero().squeeze(1))
            for b in range(stats.num_samples)
        ]
        row_group = stats.sample
    return LovaszFunction.apply(stats.logp, stats.target, groups, row_group)


REGION_LOSSES: dict[str, Callable[..., Tensor]] = {
    "generalized_dice": generalized_dice,
    "tversky": tversky,
    "dice": dice,
    "jaccard": jaccard,
    "lovasz": lovasz,
}


def region_loss(
    mixture: dict[str, dict[str, Any]],
    stats: ClassStats,
    sample_share: float = 1.0,
    reduction: str = "mean",
) -> Tensor:
    """Σ_i w_i · (mean or sum over groups) of the region part of a mixture, times
    `sample_share`; with reduction "none", (S,) the per-sample sums (groups are samples)."""
    total = stats.logp.new_zeros(stats.num_samples if reduction == "none" else ())
    for name, params in mixture.items():
        kwargs = {k: v for k, v in params.items() if k != "weight"}
        groups = REGION_LOSSES[name](stats, **kwargs)
        if reduction != "none":
            groups = groups.sum() if reduction == "sum" else groups.mean()
        total = total + params["weight"] * groups
    return total * sample_share
