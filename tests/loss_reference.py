"""A deliberately naive float64 reference of `docs/losses.md`, for the tests.

It follows the spec's formulas literally (full softmax, one-hot over the vocabulary,
a Python loop over classes for Lovász), sharing no code with `qseg.losses`.
"""

import torch
import torch.nn.functional as F


def reference_loss(
    logits,
    labels,
    losses,
    ignore_index=-100,
    *,
    softcap=None,
    scale=None,
    reduction="mean",
    token_weights=None,
):
    """Σ weight · loss for a normalized mixture {name: {"weight": w, **params}}.

    The logits are first multiplied by `scale` and capped to softcap·tanh(z / softcap).
    Token-wise terms are per valid token, times `token_weights` (labels' shape) there;
    region terms per group (sample, or the batch for lovasz per_sample=False). "mean" and
    "sum" reduce each over its tokens or groups; "none" returns token-wise terms in the
    labels' shape (0 where ignored) or region terms per sample (0 for empty ones).
    """
    logits = logits.double()
    if scale is not None:
        logits = logits * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    valid = labels != ignore_index
    total = None
    for name, params in losses.items():
        params = dict(params)
        weight = params.pop("weight")
        terms = LOSSES[name](logits, labels, ignore_index, **params)
        if name in TOKEN_WISE:
            if token_weights is not None:
                terms = terms * token_weights.double()[valid]
            if reduction == "none":
                terms = torch.zeros(labels.shape, dtype=terms.dtype).masked_scatter(valid, terms)
        elif reduction == "none":
            has_valid = valid.reshape(labels.shape[0], -1).any(1)
            terms = torch.zeros(labels.shape[0], dtype=terms.dtype).masked_scatter(has_valid, terms)
        if reduction == "mean":
            terms = terms.mean()
        elif reduction == "sum":
            terms = terms.sum()
        total = weight * terms if total is None else total + weight * terms
    return total


def _valid_label_probs(logits, labels, ignore_index):
    valid = labels != ignore_index
    probs = logits.softmax(-1)[valid]
    return probs.gather(1, labels[valid][:, None]).squeeze(1)


def cross_entropy(logits, labels, ignore_index, label_smoothing=0.0):
    valid = labels != ignore_index
    logp = logits[valid].log_softmax(-1)
    nll = -logp.gather(1, labels[valid][:, None]).squeeze(1)
    return (1 - label_smoothing) * nll - label_smoothing * logp.mean(-1)


def z_loss(logits, labels, ignore_index):
    valid = labels != ignore_index
    return torch.logsumexp(logits[valid], dim=-1) ** 2


def focal(logits, labels, ignore_index, gamma):
    p = _valid_label_probs(logits, labels, ignore_index)
    return -((1 - p) ** gamma) * p.log()


def self_adjusting_dice(logits, labels, ignore_index, alpha, gamma):
    p = _valid_label_probs(logits, labels, ignore_index)
    q = (1 - p) ** alpha * p
    return 1 - (2 * q + gamma) / (q + 1 + gamma)


def _samples(logits, labels, ignore_index):
    """(probs (m, V), one-hot (m, V)) of each sample with at least one valid token."""
    vocab = logits.shape[-1]
    for b in range(labels.shape[0]):
        valid = labels[b] != ignore_index
        if valid.any():
            yield logits[b][valid].softmax(-1), F.one_hot(labels[b][valid], vocab).double()


def generalized_dice(logits, labels, ignore_index, smooth, absent_weight):
    losses = []
    for probs, onehot in _samples(logits, labels, ignore_index):
        n = onehot.sum(0)
        soft = probs.sum(0)
        overlap = (probs * onehot).sum(0)
        present = n > 0
        w = torch.zeros_like(n)
        w[present] = 1 / n[present] ** 2
        w[~present] = {"max": w.max().item(), "reference": 1e20, "zero": 0.0}[absent_weight]
        numer = (w * overlap).sum() + smooth
        denom = (w * (soft + n)).sum() + smooth
        losses.append(1 - 2 * numer / denom)
    return torch.stack(losses)


def tversky(logits, labels, ignore_index, alpha, beta, smooth):
    losses = []
    for probs, onehot in _samples(logits, labels, ignore_index):
        present = onehot.sum(0) > 0
        tp = (probs * onehot).sum(0)
        fp = (probs * (1 - onehot)).sum(0)
        fn = ((1 - probs) * onehot).sum(0)
        index = (tp + smooth) / (tp + alpha * fp + beta * fn + smooth)
        losses.append(1 - index[present].mean())
    return torch.stack(losses)


def dice(logits, labels, ignore_index, smooth):
    return tversky(logits, labels, ignore_index, 0.5, 0.5, smooth)


def jaccard(logits, labels, ignore_index, smooth):
    return tversky(logits, labels, ignore_index, 1.0, 1.0, smooth)


def _lovasz_group(probs, targets):
    class_losses = []
    for c in targets.unique().tolist():
        fg = (targets == c).double()
        errors = (fg - probs[:, c]).abs()
        order = torch.argsort(errors.detach(), descending=True)
        e, g = errors[order], fg[order]
        jac = []
        for i in range(len(g)):
            inter = g.sum() - g[: i + 1].sum()
            union = g.sum() + (1 - g[: i + 1]).sum()
            jac.append(1 - inter / union)
        jac = torch.stack(jac)
        delta = torch.cat([jac[:1], jac[1:] - jac[:-1]])
        class_losses.append((e * delta).sum())
    return torch.stack(class_losses).mean()


def lovasz(logits, labels, ignore_index, per_sample):
    if not per_sample:
        valid = labels != ignore_index
        return _lovasz_group(logits[valid].softmax(-1), labels[valid])[None]
    groups = []
    for b in range(labels.shape[0]):
        valid = labels[b] != ignore_index
        if valid.any():
            groups.append(_lovasz_group(logits[b][valid].softmax(-1), labels[b][valid]))
    return torch.stack(groups)


LOSSES = {
    "cross_entropy": cross_entropy,
    "focal": focal,
    "self_adjusting_dice": self_adjusting_dice,
    "generalized_dice": generalized_dice,
    "tversky": tversky,
    "dice": dice,
    "jaccard": jaccard,
    "lovasz": lovasz,
    "z_loss": z_loss,
}
TOKEN_WISE = ("cross_entropy", "focal", "self_adjusting_dice", "z_loss")
