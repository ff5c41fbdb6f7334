"""The two autograd functions of the chunked engine, and the calls the API makes.

- `TokenLossFunction`, for mixtures of token-wise losses only. Each token's gradient
  depends on that token alone, so it is formed during the forward, chunk by chunk; the
  backward only scales it.
- `HeadColumnsFunction`, for everything else. The forward returns each row's
  log-probabilities of a small set of columns (the classes present in the batch); the
  loss is then ordinary autograd on that small tensor. The backward recomputes each
  chunk's softmax to turn the small upstream gradient into the logit gradient
  dz = scatter(g) − p · Σg, never storing it.

Both walk the rows with `qseg.losses.engine`'s chunk machinery (looked up on the module,
so that it is one definition for both).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from . import engine, kernels


def _refuse_double_backward() -> None:
    # Autograd runs a backward with grad enabled only for create_graph=True. These
    # backwards are not differentiable: their result would silently lack the second order.
    if torch.is_grad_enabled():
        raise RuntimeError(
            "qseg's fused losses have no second derivative (create_graph=True, double "
            "backward); for gradient penalties or higher-order gradients compute the loss "
            "with loss_from_logits on the full logits"
        )


def _split_parts(parts: Sequence[Tensor]) -> tuple[Sequence[Tensor], Sequence[Tensor]]:
    return parts[0::2], parts[1::2]


class TokenLossFunction(torch.autograd.Function):
    """scale · Σ_t f(log p_t(y_t)) over the scored rows, its gradient formed in the forward.

    Inputs: labels (n,), per_token_loss f: (c,) -> (c,), or the same mixture as
    `kernels.TokenTerms` to run each chunk's pass as one Triton kernel, scale, chunk_rows,
    index (n,) of the scored rows among the parts' N (None: all N = n, in order), bias (V,)
    or None, then the parts h_1 (N, d_1), W_1 (V, d_1), h_2, W_2, ...
    Output: a 0-dim tensor. The scale (1 / tokens for a mean) is applied inside, so the
    upstream gradient is usually 1 and the gradient buffers are handed over uncopied.
    """

    @staticmethod
    def forward(ctx, labels, per_token_loss, scale, chunk_rows, index, bias, *parts):
        hiddens, weights = _split_parts(parts)
        dtype = engine.accumulation_dtype(bias, *parts)
        logsumexp = engine._kernel(engine._logsumexp, labels.device)
        scaled_softmax_ = engine._kernel(engine._scaled_softmax_, labels.device)
        sink = engine._GradientSink(hiddens, weights, bias, ctx.needs_input_grad[5:])
        wants_grad = any(ctx.needs_input_grad[5:])
        total = torch.zeros((), dtype=dtype, device=labels.device)
        for rows, picked in engine._chunks(labels.shape[0], chunk_rows, index):
            chunk = engine._take(hiddens, picked)
            logits = engine.chunk_logits(chunk, weights, bias, dtype)
            if isinstance(per_token_loss, kernels.TokenTerms):
                grad_scale = scale if wants_grad else None
                losses, _ = kernels.token_loss_pass_(
                    logits, labels[rows], per_token_loss, grad_scale=grad_scale
                )
                total += losses.sum()
                if wants_grad:
                    sink.add(logits, chunk, picked)
                del logits
                continue
            lse = logsumexp(logits, dtype)
            target = labels[rows, None]
            logp = logits.gather(1, target).squeeze(1).to(dtype) - lse
            if not wants_grad:
                total += per_token_loss(logp).sum()
            else:
                with torch.enable_grad():
                    logp = logp.detach().requires_grad_()
                    loss = per_token_loss(logp).sum()
                    (g,) = torch.autograd.grad(loss, logp)
                    g = g * scale
                total += loss.detach()
                # d f / d z = g · (onehot(y) − p), written over the logits
                scaled_softmax_(logits, lse, -g)
                logits.scatter_add_(1, target, g[:, None].to(logits.dtype))
                sink.add(logits, chunk, picked)
            del logits  # else it holds this chunk's buffer while the next one is made
        ctx.save_for_backward(*(g for g in sink.grads() if g is not None))
        ctx.present = [g is not None for g in sink.grads()]
        return total * scale

    @staticmethod
    def backward(ctx, grad_total):
        _refuse_double_backward()
        try:
            saved = iter(ctx.saved_tensors)
        except RuntimeError as err:  # autograd's version check
            raise RuntimeError(
                "a fused token-wise loss hands autograd its gradient buffers uncopied, so a "
                "further backward through the same loss (retain_graph=True) fails once those "
                "gradients have changed in place (accumulated into, or edited): compute the "
                "loss again for each backward"
            ) from err
        grads = [next(saved) if present else None for present in ctx.present]
        # With an upstream gradient of 1 autograd adopts the buffers as .grad; scaling
        # them would copy each one, a (V, d) copy for a trainable head.
        if not torch.equal(grad_total, torch.ones_like(grad_total)):
            grads = [g * grad_total if g is not None else None for g in grads]
        return None, None, None, None, None, *grads


class HeadColumnsFunction(torch.autograd.Function):
    """Per-row log-probabilities of shared columns, in bounded memory.

    Inputs: columns (k,) long, with_rest, use_triton (the passes over a chunk's logits as
    Triton kernels), chunk_rows, index (n,) of the scored rows among the parts' N (None:
    all N = n, in order), bias (V,) or None, then the parts h_1 (N, d_1), W_1 (V, d_1), h_2,
    W_2, ...
    Output: (n, k) log p_t(c) for the classes c in `columns`, in the accumulation dtype;
    with `with_rest`, (n, k + 1), the last column log Σ_{c ∉ columns} p_t(c), the rest of
    the vocabulary's probability, from its own log-sum-exp (1 − Σ_c p_t(c) would cancel).
    Its backward, for an upstream G (n, k), forms dz_t = scatter(G_t) − p_t · Σ_c G_tc; the
    rest's upstream g adds g · (exp(z − lse_rest) off the columns − p_t).
    """

    @staticmethod
    def forward(ctx, columns, with_rest, use_triton, chunk_rows, index, bias, *parts):
        hiddens, weights = _split_parts(parts)
        dtype = engine.accumulation_dtype(bias, *parts)
        logsumexp = engine._kernel(engine._logsumexp, columns.device)
        n = hiddens[0].shape[0] if index is None else index.shape[0]
        k = columns.shape[0]
        lse = torch.empty(n, dtype=dtype, device=columns.device)
        rest_lse = torch.empty(n, dtype=dtype, device=columns.device) if with_rest else None
        logp = torch.empty(n, k + with_rest, dtype=dtype, device=columns.device)
        if use_triton and with_rest:
            in_columns = torch.zeros(weights[0].shape[0], dtype=torch.bool, device=columns.device)
            in_columns[columns] = True
        for rows, picked in engine._chunks(n, chunk_rows, index):
            logits = engine.chunk_logits(engine._take(hiddens, picked), weights, bias, dtype)
            at_columns = logits.index_select(1, columns).to(dtype)
            if use_triton:
                # One kernel reads the logits once for both log-sum-exps.
                if with_rest:
                    lse[rows], rest_lse[rows] = kernels.row_logsumexp(logits, exclude=in_columns)
                    logp[rows, k] = rest_lse[rows] - lse[rows]
                else:
                    lse[rows] = kernels.row_logsumexp(logits)
            # The backward recomputes the logits: their log-sum-exp may consume them.
            elif with_rest:
                logits.index_fill_(1, columns, float("-inf"))
                rest_lse[rows] = engine.consuming_logsumexp(logits, dtype, logsumexp)
                # The whole vocabulary's from its two parts: a sum, nothing cancels.
                whole = torch.logaddexp(rest_lse[rows], torch.logsumexp(at_columns, dim=1))
                lse[rows] = whole
                logp[rows, k] = rest_lse[rows] - whole
            else:
                lse[rows] = engine.consuming_logsumexp(logits, dtype, logsumexp)
            logp[rows, :k] = at_columns - lse[rows, None]
            del logits  # else it holds this chunk's buffer while the next one is made
        # rest_lse is kept as is, not rebuilt from logp + lse, which loses its low digits
        # once the logits are huge. It is −inf where there is no rest (every class present,
        # or the others at −inf).
        ctx.chunk_rows = chunk_rows
        ctx.use_triton = use_triton
        ctx.save_for_backward(columns, index, lse, rest_lse, bias, *parts)
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        _refuse_double_backward()
        # Run under autocast, its matmuls would change dtype (see `fused_linear_loss`).
        with torch.autocast(grad_logp.device.type, enabled=False):
            return HeadColumnsFunction._backward(ctx, grad_logp)

    @staticmethod
    def _backward(ctx, grad_logp):
        columns, index, lse, rest_lse, bias, *parts = ctx.saved_tensors
        hiddens, weights = _split_parts(parts)
        if ctx.use_triton:
            scaled_softmax_ = kernels.scaled_softmax_
        else:
            scaled_softmax_ = engine._kernel(engine._scaled_softmax_, lse.device)
        if rest_lse is not None:
            # The exponent's origin off the columns: rest_lse, or 0 where there is no rest
            # (z is −inf there, so exp(z − 0) = 0 where exp(z − rest_lse) would be NaN).
            has_rest = rest_lse > float("-inf")
            rest_origin = torch.where(has_rest, rest_lse, 0.0)
        sink = engine._GradientSink(hiddens, weights, bias, ctx.needs_input_grad[5:])
        k = columns.shape[0]
        for rows, picked in engine._chunks(lse.shape[0], ctx.chunk_rows, index):
            chunk = engine._take(hiddens, picked)
            logits = engine.chunk_logits(chunk, weights, bias, lse.dtype)
            g = grad_logp[rows]
            scale = -g.sum(1)
            if rest_lse is None:
                scaled_softmax_(logits, lse[rows], scale)
                logits.index_add_(1, columns, g.to(logits.dtype))
            else:
                # Off the columns dz = scale · p + g_rest · exp(z − rest_lse), and there
                # p = exp(z − rest_lse) · exp(rest_lse − lse), a factor ≤ 1 per row: so dz is
                # one scaled exponential of z − rest_lse. The columns' entries (where it
                # may overflow) are written whole after.
                p = (logits.index_select(1, columns).to(lse.dtype) - lse[rows, None]).exp()
                to_p = torch.where(has_rest[rows], (rest_lse[rows] - lse[rows]).exp(), 0.0)
                scaled_softmax_(logits, rest_origin[rows], scale * to_p + g[:, k])
                columns_grad = g[:, :k] + p * scale[:, None]
                logits.index_copy_(1, columns, columns_grad.to(logits.dtype))
            sink.add(logits, chunk, picked)
            del logits  # else it holds this chunk's buffer while the next one is made
        return None, None, None, None, None, *sink.grads()


def token_loss(
    labels: Tensor,
    per_token_loss: Callable[[Tensor], Tensor] | kernels.TokenTerms,
    scale: float,
    chunk_rows: int,
    hiddens: Sequence[Tensor],
    weights: Sequence[Tensor],
    bias: Tensor | None,
    index: Tensor | None = None,
) -> Tensor:
    """scale · Σ_t f(log p_t(y_t)) over the rows `index` of the parts (see
    `TokenLossFunction`); labels (n,) follow `index` (n,), or all rows when it is None."""
    parts = _interleave(hiddens, weights)
    if not torch.is_grad_enabled():
        # Under no_grad / inference_mode the forward would still form the gradients its
        # inputs ask for (and inference_mode forbids it): detached, it forms none.
        parts = [p.detach() for p in parts]
        bias = bias.detach() if bias is not None else None
    return TokenLossFunction.apply(labels, per_token_loss, scale, chunk_rows, index, bias, *parts)


def column_log_probs(
    columns: Tensor,
    chunk_rows: int,
    hiddens: Sequence[Tensor],
    weights: Sequence[Tensor],
    bias: Tensor | None,
    index: Tensor | None = None,
    with_rest: bool = False,
    use_triton: bool = False,
) -> Tensor:
    """(n, k) log p_t(c) of the rows `index` (n,) of the parts (all rows when None) for the
    classes c in `columns` (k,); with `with_rest`, (n, k + 1), the last column the log of
    the probability of all other classes (see `HeadColumnsFunction`)."""
    parts = _interleave(hiddens, weights)
    return HeadColumnsFunction.apply(
        columns, with_rest, use_triton, chunk_rows, index, bias, *parts
    )


def _interleave(hiddens: Sequence[Tensor], weights: Sequence[Tensor]) -> list[Tensor]:
    """[h_1, W_1, h_2, W_2, ...], the flat argument list of the autograd functions."""
    return [t for pair in zip(hiddens, weights, strict=True) for t in pair]
