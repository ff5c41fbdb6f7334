"""The Triton programs behind `qseg.losses.kernels`, and the math they compute.

The logits the losses see. From the raw logits r (the head's product), with a logit scale
s (1 when unused) and an optional soft cap c:
    z = s·r,  or  z = c·tanh(s·r / c);   dz/dr = s,  or  s·(1 − tanh²(s·r / c)).
Every gradient below is with respect to z and is multiplied by dz/dr before it is written.

The token-wise pass. With lse = log Σ_v exp(z_v), p = softmax(z), ℓ = z_y − lse the label's
log-probability and u = max(1 − p_y, tiny) (1 − p_y formed as −expm1(ℓ)), a row's loss is
    L = F(ℓ) + w_ce·ε·(lse − mean_v z_v) + λ·lse²
    F(ℓ) = −w_ce·(1 − ε)·ℓ                                    cross-entropy, smoothing ε
           − w_f·u^γ·ℓ                                         focal (γ)
           + w_d·(1 − (2q + γ_d) / (q + 1 + γ_d)), q = u^α·p_y  self-adjusting dice (α, γ_d)
times the row's weight ω (1 without weights); λ is the z-loss weight. With ∂u/∂ℓ = −p_y
(0 where u is floored, as autograd through the floor gives):
    F'(ℓ) = w_ce·(1 − ε)·(−1)
          + w_f·(γ·u^(γ−1)·p_y·ℓ − u^γ)
          − w_d·(2 + γ_d) / (q + 1 + γ_d)² · p_y·(u^α − α·u^(α−1)·p_y)
and, as ∂ℓ/∂z = onehot(y) − p, ∂lse/∂z = p and ∂mean z/∂z = 1/V, the logit gradient is
    dL/dz = (w_ce·ε + 2λ·lse − F'(ℓ))·p + F'(ℓ)·onehot(y) − w_ce·ε / V,
scaled by ω and by `grad_scale` (1 / tokens for a mean). Rows labelled `ignore_index` get a
zero loss and a zero gradient.

The region passes: `kernels.row_logsumexp` gives lse, and with an `exclude` mask the
log-sum-exp of the columns outside it; `kernels.scaled_softmax_` writes
g_t · exp(z − origin_t) · dz/dr, the softmax part of a gradient, to which the engine adds
the columns' own terms.

One program handles one row of a chunk's (n, V) logits, walking the vocabulary in blocks
of BLOCK columns. Everything is accumulated in float32 whatever the logits' dtype. This
module imports triton, so only `kernels` imports it, and only when a kernel runs: whether
programs are compiled or interpreted (TRITON_INTERPRET=1) is fixed when they are defined.

The programs call only triton's builtins and jit functions of their own, none of
`triton.language`'s jit-written helpers (tl.sum, tl.max, tl.zeros): those are fixed as
compiled or interpreted when triton is imported, which another library may have done
before TRITON_INTERPRET was set, and compiled helpers cannot run inside the interpreter.
"""

import triton
import triton.language as tl

# The smallest normal float32: 1 − p is floored there, as `functional._one_minus` does with
# its dtype's, so that (1 − p)^γ keeps a finite gradient for γ < 1.
FLOAT32_TINY = tl.constexpr(1.1754943508222875e-38)


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _larger(a, b):
    return tl.maximum(a, b)


@triton.jit
def _expm1(x):
    """exp(x) − 1 to a few ulps near 0 (Kahan's correction), for x ≤ 0 or moderate x."""
    u = tl.exp(x)
    d = u - 1.0
    log_u = tl.log(u)
    safe = (d != 0.0) & (d != -1.0) & (log_u != 0.0)
    corrected = d * x / tl.where(safe, log_u, 1.0)
    return tl.where(safe, corrected, d)


@triton.jit
def _capped(raw, logit_scale, softcap, HAS_CAP: tl.constexpr):
    """(z, dz/draw): z = s·raw, or c·tanh(s·raw/c) with a cap, and its derivative."""
    if HAS_CAP:
        y = raw * (logit_scale / softcap)
        # tanh(|y|) = −expm1(−2|y|) / (2 + expm1(−2|y|)): no cancellation near 0.
        e = _expm1(-2.0 * tl.abs(y))
        t = -e / (2.0 + e)
        t = tl.where(y < 0, -t, t)
        z = softcap * t
        chain = logit_scale * (1.0 - t * t)
    else:
        z = raw * logit_scale
        chain = logit_scale
    return z, chain


@triton.jit
def _online_lse(m, s, z):
    """Fold a block of logits z into a running (max m, Σ exp(z − m)); −inf rows stay 0."""
    m_new = tl.maximum(m, tl.reduce(z, 0, _larger))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    s = s * tl.exp(m - m_safe) + tl.reduce(tl.exp(z - m_safe), 0, _add)
    return m_new, s


@triton.jit
def _finish_lse(m, s):
    return tl.log(s) + tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def token_pass_kernel(
    logits_ptr,
    row_stride,
    labels_ptr,
    row_weights_ptr,
    loss_ptr,
    lse_ptr,
    V,
    ignore_index,
    grad_scale,
    logit_scale,
    softcap,
    ce_weight,
    smoothing,
    focal_weight,
    focal_gamma,
    sadl_weight,
    sadl_alpha,
    sadl_gamma,
    z_weight,
    HAS_CAP: tl.constexpr,
    HAS_ROW_WEIGHTS: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_FOCAL: tl.constexpr,
    HAS_SADL: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * row_stride
    cols = tl.arange(0, BLOCK)
    label = tl.load(labels_ptr + row).to(tl.int64)
    valid = label != ignore_index
    label = tl.where(valid, label, 0)

    # Pass 1: the log-sum-exp (and Σ_v z_v for label smoothing).
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.full((), 0.0, tl.float32)
    z_sum = tl.full((), 0.0, tl.float32)
    for start in range(0, V, BLOCK):
        offs = start + cols
        inside = offs < V
        raw = tl.load(base + offs, mask=inside, other=0.0).to(tl.float32)
        z, _ = _capped(raw, logit_scale, softcap, HAS_CAP)
        m, s = _online_lse(m, s, tl.where(inside, z, float("-inf")))
        if HAS_SMOOTHING:
            z_sum += tl.reduce(tl.where(inside, z, 0.0), 0, _add)
    lse = _finish_lse(m, s)

    z_label, _ = _capped(tl.load(base + label).to(tl.float32), logit_scale, softcap, HAS_CAP)
    logp = z_label - lse
    p_label = tl.exp(logp)
    one_minus = -_expm1(logp)
    unclamped = one_minus >= FLOAT32_TINY
    u = tl.maximum(one_minus, FLOAT32_TINY)
    log_u = tl.log(u)

    # loss = F(logp) + ε_w·(lse − mean z) + λ·lse²; F' = dF/dlogp.
    ce_label = ce_weight * (1.0 - smoothing)
    loss = -ce_label * logp
    d_logp = -ce_label
    if HAS_FOCAL:
        u_g = tl.exp(focal_gamma * log_u)
        loss += focal_weight * (-u_g * logp)
        d_u = tl.where(unclamped, focal_gamma * tl.exp((focal_gamma - 1.0) * log_u), 0.0)
        d_logp += focal_weight * (d_u * p_label * logp - u_g)
    if HAS_SADL:
        u_a = tl.exp(sadl_alpha * log_u)
        q = u_a * p_label
        denom = q + 1.0 + sadl_gamma
        loss += sadl_weight * (1.0 - (2.0 * q + sadl_gamma) / denom)
        d_u = tl.where(unclamped, sadl_alpha * tl.exp((sadl_alpha - 1.0) * log_u), 0.0)
        d_q = p_label * (u_a - d_u * p_label)
        d_logp += sadl_weight * (-(2.0 + sadl_gamma) / (denom * denom)) * d_q
    smooth_weight = ce_weight * smoothing
    if HAS_SMOOTHING:
        loss += smooth_weight * (lse - z_sum / V)
    loss += z_weight * lse * lse

    row_weight = 1.0
    if HAS_ROW_WEIGHTS:
        row_weight = tl.load(row_weights_ptr + row).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(valid, row_weight * loss, 0.0))
    tl.store(lse_ptr + row, lse)

    if WRITE_GRAD:
        # dz = a·p + b·onehot(label) + c, then the chain through the cap.
        factor = tl.where(valid, row_weight * grad_scale, 0.0)
        a = (smooth_weight + 2.0 * z_weight * lse - d_logp) * factor
        b = d_logp * factor
        c = -smooth_weight / V * factor
        for start in range(0, V, BLOCK):
            offs = start + cols
            inside = offs < V
            raw = tl.load(base + offs, mask=inside, other=0.0).to(tl.float32)
            z, chain = _capped(raw, logit_scale, softcap, HAS_CAP)
            dz = a * tl.exp(z - lse) + c + tl.where(offs == label, b, 0.0)
            tl.store(base + offs, (dz * chain).to(logits_ptr.dtype.element_ty), mask=inside)


@triton.jit
def row_logsumexp_kernel(
    logits_ptr,
    row_stride,
    exclude_ptr,
    lse_ptr,
    rest_lse_ptr,
    V,
    logit_scale,
    softcap,
    HAS_CAP: tl.constexpr,
    HAS_EXCLUDE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * row_stride
    cols = tl.arange(0, BLOCK)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.full((), 0.0, tl.float32)
    m_rest = tl.full((), float("-inf"), tl.float32)
    s_rest = tl.full((), 0.0, tl.float32)
    for start in range(0, V, BLOCK):
        offs = start + cols
        inside = offs < V
        raw = tl.load(base + offs, mask=inside, other=0.0).to(tl.float32)
        z, _ = _capped(raw, logit_scale, softcap, HAS_CAP)
        z = tl.where(inside, z, float("-inf"))
        m, s = _online_lse(m, s, z)
        if HAS_EXCLUDE:
            excluded = tl.load(exclude_ptr + offs, mask=inside, other=1) != 0
            m_rest, s_rest = _online_lse(m_rest, s_rest, tl.where(excluded, float("-inf"), z))
    tl.store(lse_ptr + row, _finish_lse(m, s))
    if HAS_EXCLUDE:
        tl.store(rest_lse_ptr + row, _finish_lse(m_rest, s_rest))


@triton.jit
def scaled_softmax_kernel(
    logits_ptr,
    row_stride,
    origin_ptr,
    row_scale_ptr,
    V,
    logit_scale,
    softcap,
    HAS_CAP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * row_stride
    cols = tl.arange(0, BLOCK)
    origin = tl.load(origin_ptr + row).to(tl.float32)
    row_scale = tl.load(row_scale_ptr + row).to(tl.float32)
    for start in range(0, V, BLOCK):
        offs = start + cols
        inside = offs < V
        raw = tl.load(base + offs, mask=inside, other=0.0).to(tl.float32)
        z, chain = _capped(raw, logit_scale, softcap, HAS_CAP)
        grad = row_scale * tl.exp(z - origin) * chain
        tl.store(base + offs, grad.to(logits_ptr.dtype.element_ty), mask=inside)
