"""The fused Triton passes (qseg.losses.kernels) against a float64 torch reference.

On a machine without CUDA they run in Triton's CPU interpreter: TRITON_INTERPRET=1 is set
for this module's tests (the programs are defined on their first launch, so it is in
force when they are), and restored after, so the rest of a session keeps the torch path.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="the kernels need the triton package")

from qseg.losses.functional import TokenInputs, weighted_token_loss  # noqa: E402
from qseg.losses.kernels import (  # noqa: E402
    TokenTerms,
    row_logsumexp,
    scaled_softmax_,
    token_loss_pass_,
    triton_available,
)

# numpy, running the interpreter, warns where a row's log-sum-exp is log(0) = −inf on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N, V, IGNORE = 7, 37, -100
# 16 columns per step walks 37 in three blocks, the last one masked; None picks one block.
BLOCKS = [16, None]


@pytest.fixture(autouse=True, scope="module")
def interpreter():
    if DEVICE == "cuda":
        yield
        return
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    yield
    if before is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = before


def make_rows(seed=0, dtype=torch.float32, label_logit=12.0):
    """(N, V) raw logits and labels: row 2 ignored, row 4 confident of its label (1 − p
    about 1e-4 by default; far below float32's resolution at 60)."""
    g = torch.Generator().manual_seed(seed)
    raw = 3 * torch.randn(N, V, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[2] = IGNORE
    raw[4, labels[4]] = label_logit
    return raw.to(dtype).to(DEVICE), labels.to(DEVICE)


def capped(raw, logit_scale, softcap):
    z = raw * logit_scale
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def reference_token_pass(raw, labels, terms, grad_scale, row_weights, logit_scale, softcap):
    """Per-row losses, lse and d(grad_scale · Σ losses)/d raw in float64, by autograd
    through the spec's formulas (torch's label smoothing, PaLM's z-loss)."""
    r = raw.double().cpu().requires_grad_()
    z = capped(r, logit_scale, softcap)
    labels = labels.cpu()
    valid = labels != IGNORE
    y = torch.where(valid, labels, 0)
    logp_all = z.log_softmax(1)
    logp = logp_all.gather(1, y[:, None]).squeeze(1)
    lse = torch.logsumexp(z, 1)
    p = logp.exp()
    eps = terms.label_smoothing
    loss = terms.cross_entropy * ((1 - eps) * -logp - eps * logp_all.mean(1))
    loss = loss + terms.focal * -((1 - p) ** terms.focal_gamma) * logp
    q = (1 - p) ** terms.sadl_alpha * p
    gd = terms.sadl_gamma
    loss = loss + terms.self_adjusting_dice * (1 - (2 * q + gd) / (q + 1 + gd))
    loss = loss + terms.z_loss * lse**2
    if row_weights is not None:
        loss = loss * row_weights.double().cpu()
    loss = torch.where(valid, loss, 0.0)
    (grad,) = torch.autograd.grad(loss.sum() * (grad_scale or 0.0), r)
    return loss.detach(), lse.detach(), grad


TERMS = {
    "cross_entropy": TokenTerms(cross_entropy=1.0),
    "smoothed_ce": TokenTerms(cross_entropy=1.0, label_smoothing=0.1),
    "focal": TokenTerms(focal=1.0),
    "focal_gamma0.5": TokenTerms(focal=1.0, focal_gamma=0.5),
    "focal_gamma0": TokenTerms(focal=1.0, focal_gamma=0.0),
    "sadl": TokenTerms(self_adjusting_dice=1.0),
    "sadl_a0.3_g2": TokenTerms(self_adjusting_dice=1.0, sadl_alpha=0.3, sadl_gamma=2.0),
    "z_loss": TokenTerms(z_loss=1e-2),
    "mixture": TokenTerms(
        cross_entropy=0.6,
        label_smoothing=0.2,
        focal=0.3,
        focal_gamma=1.5,
        self_adjusting_dice=0.1,
        sadl_alpha=0.5,
        sadl_gamma=0.3,
        z_loss=1e-3,
    ),
}


def check_token_pass(terms, dtype=torch.float32, block=16, grad_scale=0.25, **options):
    raw, labels = make_rows(dtype=dtype)
    buffer = raw.clone()
    loss, lse = token_loss_pass_(
        buffer, labels, terms, grad_scale=grad_scale, block_size=block, **options
    )
    ref_loss, ref_lse, ref_grad = reference_token_pass(
        raw,
        labels,
        terms,
        grad_scale,
        options.get("row_weights"),
        options.get("logit_scale", 1.0),
        options.get("softcap"),
    )
    assert loss.dtype == lse.dtype == torch.float32
    torch.testing.assert_close(loss.cpu().double(), ref_loss, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(lse.cpu().double(), ref_lse, rtol=2e-6, atol=2e-6)
    # float32 rounding of lse (about 1e-6 at 12) bounds the error of p; the gradient is
    # rounded to the logits' dtype once, when it is written.
    tol = {"rtol": 1e-5, "atol": 2e-6} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-4}
    expected = ref_grad if grad_scale is not None else raw.cpu().double()
    torch.testing.assert_close(buffer.cpu().double(), expected.to(dtype).double(), **tol)
    assert (buffer[2] == 0).all() or grad_scale is None  # the ignored row


@pytest.mark.parametrize("name", TERMS)
@pytest.mark.parametrize("block", BLOCKS)
def test_token_pass_matches_the_reference(name, block):
    check_token_pass(TERMS[name], block=block)


def test_token_pass_with_scale_cap_and_row_weights():
    weights = torch.rand(N, generator=torch.Generator().manual_seed(3)).to(DEVICE) * 2
    for name in ("cross_entropy", "mixture"):
        check_token_pass(TERMS[name], row_weights=weights, logit_scale=0.7, softcap=4.0)
    check_token_pass(TERMS["focal"], logit_scale=1.3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_token_pass_reads_and_writes_half_logits(dtype):
    check_token_pass(TERMS["mixture"], dtype=dtype, softcap=6.0)


def test_token_pass_without_a_gradient_leaves_the_logits():
    check_token_pass(TERMS["mixture"], grad_scale=None)


def test_token_pass_where_the_label_is_certain_matches_the_torch_pass():
    """Row 4's 1 − p rounds to 0 in float32: the floor keeps (1 − p)^γ finite for γ < 1,
    and the gradient is the one autograd gives through the float32 torch math."""
    raw, labels = make_rows(label_logit=60.0)
    mixtures = [
        {"focal": {"weight": 1.0, "gamma": 0.5}},
        {"self_adjusting_dice": {"weight": 1.0, "alpha": 0.2, "gamma": 1.0}},
    ]
    for mixture in mixtures:
        buffer = raw.clone()
        loss, _ = token_loss_pass_(buffer, labels, TokenTerms.from_losses(mixture), grad_scale=1.0)
        z = raw.cpu().clone().requires_grad_()
        valid = labels.cpu() != IGNORE
        logp = z.log_softmax(1)[valid].gather(1, labels.cpu()[valid][:, None]).squeeze(1)
        expected = weighted_token_loss(mixture)(TokenInputs(logp, None, None))
        expected.sum().backward()
        assert torch.isfinite(loss).all() and torch.isfinite(buffer).all()
        torch.testing.assert_close(loss.cpu()[valid], expected.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(buffer.cpu(), z.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_row_logsumexp_whole_and_rest(block, softcap):
    raw, _ = make_rows(seed=1)
    raw[5] = float("-inf")  # a row with nothing: −inf, as the torch pass gives
    exclude = torch.zeros(V, dtype=torch.bool, device=DEVICE)
    exclude[[0, 3, 17, 36]] = True
    raw[6, ~exclude] = float("-inf")  # no rest outside the excluded columns
    before = raw.clone()
    lse, rest = row_logsumexp(raw, exclude=exclude, softcap=softcap, block_size=block)
    assert torch.equal(raw, before)
    # Under a cap a −inf raw logit is −c, as c·tanh(−inf) is: only uncapped rows stay −inf.
    z = capped(raw.double().cpu(), 1.0, softcap)
    torch.testing.assert_close(lse.cpu().double(), torch.logsumexp(z, 1), rtol=2e-6, atol=2e-6)
    outside = z.masked_fill(exclude.cpu(), float("-inf"))
    expected_rest = torch.logsumexp(outside, 1)
    torch.testing.assert_close(rest.cpu().double(), expected_rest, rtol=2e-6, atol=2e-6)
    assert row_logsumexp(raw, block_size=block, softcap=softcap).shape == (N,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_scaled_softmax_in_place(dtype, softcap):
    raw, _ = make_rows(seed=2, dtype=dtype)
    g = torch.Generator().manual_seed(4)
    z = capped(raw.double().cpu(), 0.8, softcap)
    origin = (torch.logsumexp(z, 1) + torch.rand(N, generator=g, dtype=torch.float64)).float()
    row_scale = torch.randn(N, generator=g)
    buffer = raw.clone()
    scaled_softmax_(
        buffer, origin.to(DEVICE), row_scale.to(DEVICE), logit_scale=0.8, softcap=softcap
    )
    y = raw.double().cpu() * 0.8
    chain = 0.8 if softcap is None else 0.8 * (1 - torch.tanh(y / softcap) ** 2)
    expected = row_scale.double()[:, None] * (z - origin.double()[:, None]).exp() * chain
    tol = {} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-4}
    torch.testing.assert_close(buffer.cpu().double(), expected.to(dtype).double(), **tol)


def test_token_terms_from_a_mixture():
    mixture = {
        "cross_entropy": {"weight": 0.5, "label_smoothing": 0.1},
        "focal": {"weight": 0.25, "gamma": 3.0},
        "self_adjusting_dice": {"weight": 0.25, "alpha": 0.5, "gamma": 0.1},
        "z_loss": {"weight": 1e-4},
    }
    assert TokenTerms.from_losses(mixture) == TokenTerms(
        cross_entropy=0.5,
        label_smoothing=0.1,
        focal=0.25,
        focal_gamma=3.0,
        self_adjusting_dice=0.25,
        sadl_alpha=0.5,
        sadl_gamma=0.1,
        z_loss=1e-4,
    )
    assert not TokenTerms.supports({"lovasz": {"weight": 1.0, "per_sample": False}})
    with pytest.raises(ValueError, match="fused token pass computes"):
        TokenTerms.from_losses({"focal": {"weight": 1.0, "beta": 2.0}})


def test_bad_input_is_refused_before_any_launch():
    raw, labels = make_rows()
    terms = TERMS["cross_entropy"]
    bad = [
        (lambda: token_loss_pass_(raw[0], labels, terms), "2-D"),
        (lambda: token_loss_pass_(raw.double(), labels, terms), "must be one of"),
        (lambda: token_loss_pass_(raw.t(), labels[:1].expand(V), terms), "contiguous rows"),
        (lambda: token_loss_pass_(raw, labels[:3], terms), r"labels must be a \(7,\)"),
        (lambda: token_loss_pass_(raw, labels.float(), terms), "integer tensor"),
        (lambda: token_loss_pass_(raw, labels, terms, softcap=0.0), "softcap None or > 0"),
        (lambda: token_loss_pass_(raw, labels, terms, block_size=24), "power of two"),
        (lambda: row_logsumexp(raw, exclude=torch.ones(V)), "bool"),
        (lambda: scaled_softmax_(raw, labels.float(), labels), "floating-point"),
    ]
    for call, message in bad:
        with pytest.raises(ValueError, match=message):
            call()


def test_availability(monkeypatch):
    assert triton_available(DEVICE)
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert not triton_available("cpu")
        raw, labels = make_rows()
        with pytest.raises(ValueError, match="cannot run on cpu"):
            token_loss_pass_(raw, labels, TERMS["cross_entropy"])
    assert not triton_available("meta")


# ---------------------------------------------------------------- through fused_linear_loss

FUSED_CASES = [
    "cross_entropy",
    {"focal": {"gamma": 0.5}},
    {"self_adjusting_dice": {"alpha": 0.5, "gamma": 0.2}},
    {"cross_entropy": 0.5, "focal": 0.3, "sadl": 0.2},
    "generalized_dice",
    {"generalized_dice": {"absent_weight": "zero"}},
    "dice",
    {"lovasz": {"per_sample": True}},
    {"focal": {"weight": 0.3, "gamma": 1.0}, "lovasz": 0.5, "sadl": 0.2},
]


def fused_batch(dtype, seed=0, b=3, t=9, d=6, vocab=37):
    """Hidden, weight, bias (float64 copies for the reference) and labels; sample 1 has
    no valid token."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, d, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, d, generator=g, dtype=torch.float64)
    bias = torch.randn(vocab, generator=g, dtype=torch.float64)
    labels = torch.randint(0, vocab, (b, t), generator=g)
    labels[0, :2] = IGNORE
    labels[1, :] = IGNORE
    labels[2, ::3] = IGNORE
    inputs = [x.to(dtype).to(DEVICE).requires_grad_() for x in (hidden, weight, bias)]
    return inputs, [x.requires_grad_() for x in (hidden, weight, bias)], labels


@pytest.mark.parametrize("case", FUSED_CASES, ids=str)
def test_fused_linear_loss_on_the_kernels_matches_the_reference(case):
    from loss_reference import reference_loss

    from qseg.losses import fused_linear_loss, normalize_losses

    (hidden, weight, bias), (h64, w64, b64), labels = fused_batch(torch.float32)
    loss = fused_linear_loss(
        hidden, weight, labels.to(DEVICE), case, bias=bias, chunk_size=5, impl="triton"
    )
    loss.backward()
    expected = reference_loss(h64 @ w64.T + b64, labels, normalize_losses(case))
    expected.backward()
    torch.testing.assert_close(loss.cpu().double(), expected, rtol=2e-5, atol=2e-6)
    for actual, reference in ((hidden, h64), (weight, w64), (bias, b64)):
        torch.testing.assert_close(actual.grad.cpu().double(), reference.grad, rtol=1e-4, atol=2e-6)


@pytest.mark.parametrize("case", ["focal", "generalized_dice"])
def test_triton_and_torch_passes_agree_on_a_half_head(case):
    """bf16 hidden states and head: on a CPU their products are upcast (float32 logits),
    on CUDA the kernels read the bf16 logits; either way the two passes agree."""
    from qseg.losses import fused_linear_loss

    (hidden, weight, _), _, labels = fused_batch(torch.bfloat16, seed=1)
    results = {}
    for impl in ("triton", "torch"):
        loss = fused_linear_loss(hidden, weight, labels.to(DEVICE), case, impl=impl)
        grads = torch.autograd.grad(loss, (hidden, weight))
        results[impl] = [loss.float(), *(g.float() for g in grads)]
    torch.testing.assert_close(results["triton"], results["torch"], rtol=2e-2, atol=2e-3)


def test_impl_choice(monkeypatch):
    from qseg.losses import FusedLinearLoss, fused_linear_loss
    from qseg.losses import kernels as kernels_module

    (hidden, weight, _), _, labels = fused_batch(torch.float32)
    labels = labels.to(DEVICE)
    launches = []
    original = kernels_module.token_loss_pass_

    def counting(*args, **kwargs):
        launches.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(kernels_module, "token_loss_pass_", counting)
    fused_linear_loss(hidden, weight, labels, "ce", chunk_size=8, impl="torch")
    assert not launches
    fused_linear_loss(hidden, weight, labels, "ce", chunk_size=8, impl="triton")
    assert len(launches) == 2  # 15 valid tokens in chunks of 8
    launches.clear()
    fused_linear_loss(hidden, weight, labels, "ce", chunk_size=8)
    # "auto": Triton on CUDA only, and only when QSEG_TRITON=1 asks for it
    assert bool(launches) == (DEVICE == "cuda" and os.environ.get("QSEG_TRITON") == "1")
    with pytest.raises(ValueError, match="impl must be one of"):
        fused_linear_loss(hidden, weight, labels, "ce", impl="cuda")
    with pytest.raises(ValueError, match="impl must be one of"):
        FusedLinearLoss("ce", impl="fast")
    with pytest.raises(ValueError, match="float64 inputs"):
        fused_linear_loss(hidden.double(), weight.double(), labels, "ce", impl="triton")
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="cannot run on cpu"):
            fused_linear_loss(hidden, weight, labels, "ce", impl="triton")


@pytest.mark.skipif(
    importlib.util.find_spec("triton.backends.nvidia") is None,
    reason="triton without its NVIDIA backend",
)
def test_programs_compile_for_a_gpu_without_spilling():
    """The interpreter runs the programs' Python; this compiles them for sm_90, in a process
    without TRITON_INTERPRET, and checks ptxas's register use (see the script)."""
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    script = root / "tests" / "compile_kernels_for_gpu.py"
    run = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=240
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("\nok ") + run.stdout.startswith("ok ") == 7, run.stdout
