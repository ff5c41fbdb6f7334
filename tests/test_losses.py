"""qseg.losses against a naive float64 reference of the spec, on every input form."""

import math
import warnings
import weakref

import numpy as np
import pytest
import torch
from loss_reference import reference_loss

from qseg.losses import (
    FusedLinearLoss,
    available_losses,
    fused_linear_loss,
    loss_from_logits,
    normalize_losses,
    observe_chunks,
    plan_chunks,
)

B, T, D, V = 3, 9, 6, 13

# Every loss with its defaults and with other parameter values.
CASES = [
    "cross_entropy",
    "focal",
    {"focal": {"gamma": 0.0}},
    {"focal": {"gamma": 3.5}},
    "self_adjusting_dice",
    {"self_adjusting_dice": {"alpha": 0.5, "gamma": 0.2}},
    "generalized_dice",
    {"generalized_dice": {"absent_weight": "reference"}},
    {"generalized_dice": {"absent_weight": "zero", "smooth": 0.5}},
    "tversky",
    {"tversky": {"alpha": 0.7, "beta": 0.2, "smooth": 1.0}},
    "dice",
    "jaccard",
    "lovasz",
    {"lovasz": {"per_sample": True}},
    {"cross_entropy": 0.6, "generalized_dice": 0.4},
    {"focal": {"weight": 0.3, "gamma": 1.0}, "lovasz": 0.5, "sadl": 0.2},
]


def case_id(case):
    return case if isinstance(case, str) else "+".join(f"{k}{v}" for k, v in case.items())


def make_batch(seed=0, dtype=torch.float64, scale=1.0):
    """Hidden, weight, bias and labels; sample 1 has no valid token, sample 2 a few."""
    g = torch.Generator().manual_seed(seed)
    hidden = (scale * torch.randn(B, T, D, generator=g, dtype=torch.float64)).to(dtype)
    weight = torch.randn(V, D, generator=g, dtype=torch.float64).to(dtype)
    bias = torch.randn(V, generator=g, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :2] = -100
    labels[1, :] = -100
    labels[2, ::2] = -100
    return hidden.requires_grad_(), weight.requires_grad_(), bias.requires_grad_(), labels


def grads(loss, *inputs):
    return torch.autograd.grad(loss, inputs)


def assert_close(actual, expected, **tol):
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a.double(), e.double(), **tol)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("chunk_size", [1, 5, 64, "auto"])
def test_fused_matches_reference(case, chunk_size):
    hidden, weight, bias, labels = make_batch()
    mixture = normalize_losses(case)
    expected = reference_loss(hidden @ weight.T + bias, labels, mixture)
    actual = fused_linear_loss(hidden, weight, labels, case, bias=bias, chunk_size=chunk_size)
    assert actual.dtype == torch.float64 and actual.dim() == 0
    assert_close([actual], [expected])
    assert_close(grads(actual, hidden, weight, bias), grads(expected, hidden, weight, bias))


@pytest.mark.parametrize(
    "case", ["focal", "lovasz", {"cross_entropy": 0.6, "dice": 0.4}], ids=case_id
)
@pytest.mark.parametrize("chunk_size", [2, 7])
def test_fused_matches_reference_when_every_position_is_scored(case, chunk_size):
    """No ignored position: the engine walks the hidden states in slices, not gathers."""
    hidden, weight, bias, labels = make_batch(seed=3)
    labels = labels.clamp(min=0)
    mixture = normalize_losses(case)
    expected = reference_loss(hidden @ weight.T + bias, labels, mixture)
    actual = fused_linear_loss(hidden, weight, labels, case, bias=bias, chunk_size=chunk_size)
    assert_close([actual], [expected])
    assert_close(grads(actual, hidden, weight, bias), grads(expected, hidden, weight, bias))


@pytest.mark.parametrize("name", ["focal", "lovasz"])
@pytest.mark.parametrize("ignore_some", [False, True])
def test_gradients_are_handed_over_uncopied(name, ignore_some, monkeypatch):
    """hidden.grad and weight.grad are the very buffers the engine filled: no (B·T, d) or
    (V, d) copy on the way (for a mean, the 1/n is applied inside the engine)."""
    filled = []

    def watch(event, details):
        if event == "grads":
            filled.extend(g.data_ptr() for g in details["grads"] if g is not None)

    hidden, weight, _, labels = make_batch(seed=6)
    labels = labels if ignore_some else labels.clamp(min=0)
    with observe_chunks(watch):
        fused_linear_loss(hidden, weight, labels, name, chunk_size=4).backward()
    assert hidden.grad.data_ptr() in filled and weight.grad.data_ptr() in filled


@pytest.mark.parametrize("name", ["cross_entropy", "generalized_dice"])
def test_ignored_positions_get_exactly_zero_hidden_gradient(name):
    hidden, weight, _, labels = make_batch(seed=4)
    (grad,) = grads(fused_linear_loss(hidden, weight, labels, name, chunk_size=3), hidden)
    assert grad.shape == hidden.shape
    assert torch.all(grad[labels == -100] == 0)
    assert torch.all(grad[labels != -100].abs().sum(-1) > 0)


@pytest.mark.parametrize(
    "case", ["cross_entropy", "lovasz", {"focal": 0.5, "dice": 0.5}], ids=case_id
)
def test_cpu_autocast_leaves_a_float32_head_in_float32(case):
    """Off CUDA half products would be upcast again, so autocast changes nothing."""
    hidden, weight, _, labels = make_batch(seed=5, dtype=torch.float32)
    expected = fused_linear_loss(hidden, weight, labels, case, chunk_size=4)
    expected_grads = grads(expected, hidden, weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        actual = fused_linear_loss(hidden, weight, labels, case, chunk_size=4)
    assert actual.dtype == torch.float32
    actual_grads = grads(actual, hidden, weight)
    assert [g.dtype for g in actual_grads] == [torch.float32, torch.float32]
    assert_close([actual, *actual_grads], [expected, *expected_grads], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_kernels_match_eager(dtype, monkeypatch):
    """The torch.compile'd elementwise kernels (used on CUDA) give the eager results; forced
    on here, inductor's CPU backend compiles the same graphs, in-place write included, so a
    compiler regression shows up before a GPU run."""
    from qseg.losses import engine

    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(2, 40, 16, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(300, 16, generator=g) / 4).to(dtype).requires_grad_()
    labels = torch.randint(0, 300, (2, 40), generator=g)
    labels[:, :7] = -100
    tol = {} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-3}
    kernels = set()

    def watch(event, details):
        if event == "kernel":
            kernels.add((details["name"], details["compiled"]))

    for case in ["cross_entropy", {"focal": 0.5, "dice": 0.5}, {"ce": 0.5, "gdice": 0.5}]:
        results = {}
        for compiled in (True, False):
            monkeypatch.setattr(engine, "uses_compiled_kernels", lambda device, c=compiled: c)
            with warnings.catch_warnings(), observe_chunks(watch):
                warnings.filterwarnings("error", message="qseg: torch.compile failed")
                loss = fused_linear_loss(hidden, weight, labels, case, chunk_size=24)
                results[compiled] = [loss, *grads(loss, hidden, weight)]
        assert_close(results[True], results[False], **tol)
    assert kernels == {("logsumexp", True), ("scaled_softmax", True),
                       ("logsumexp", False), ("scaled_softmax", False)}  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_log_sum_exps_that_consume_the_logits(dtype):
    """In place for float32 logits, through the kernel for half ones (CUDA's); the rest of
    the vocabulary's is −inf for a row whose classes outside the columns are all at −inf."""
    from qseg.losses import engine

    logits = (10 * torch.randn(3, 50, generator=torch.Generator().manual_seed(0))).to(dtype)
    columns = torch.tensor([0, 3, 4, 7])
    others = torch.ones(50, dtype=torch.bool).index_fill(0, columns, False)
    logits[2, others] = float("-inf")
    expected = torch.logsumexp(logits.float()[:, others], dim=1)
    rest = logits.index_fill(1, columns, float("-inf"))
    rest = engine.consuming_logsumexp(rest, torch.float32)
    assert rest.dtype == torch.float32 and rest[2] == float("-inf")
    torch.testing.assert_close(rest, expected)
    whole = engine.consuming_logsumexp(logits.clone(), torch.float32)
    torch.testing.assert_close(whole, torch.logsumexp(logits.float(), dim=1))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_loss_from_logits_matches_reference(case):
    hidden, weight, bias, labels = make_batch(seed=1)
    logits = (hidden @ weight.T + bias).detach().requires_grad_()
    expected = reference_loss(logits, labels, normalize_losses(case))
    actual = loss_from_logits(logits, labels, case)
    assert_close([actual], [expected])
    assert_close(grads(actual, logits), grads(expected, logits))


@pytest.mark.parametrize("name", ["cross_entropy", "generalized_dice", "lovasz", "tversky"])
def test_gradcheck(name):
    hidden, weight, bias, labels = make_batch(seed=2)

    def fn(h, w, b):
        return fused_linear_loss(h, w, labels, name, bias=b, chunk_size=4)

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


@pytest.mark.parametrize("name", ["focal", "lovasz", "generalized_dice"])
def test_no_valid_position_gives_zero_and_zero_grads(name):
    hidden, weight, _, labels = make_batch()
    labels = torch.full_like(labels, -100)
    loss = fused_linear_loss(hidden, weight, labels, name)
    loss.backward()
    assert loss.item() == 0.0
    assert hidden.grad is not None and torch.all(hidden.grad == 0)
    assert weight.grad is not None and torch.all(weight.grad == 0)
    frozen_hidden = hidden.detach()  # still connected through the head alone
    fused_linear_loss(frozen_hidden, weight, labels, name).backward()
    logits = (hidden @ weight.T).detach().requires_grad_()
    zero = loss_from_logits(logits, labels, name)
    zero.backward()
    assert zero.dtype == torch.float64 and torch.all(logits.grad == 0)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("case", ["focal", {"ce": 0.5, "lovasz": 0.5}], ids=case_id)
def test_evaluation_under_no_grad_forms_no_gradient(mode, case, monkeypatch):
    """A trainable head under no_grad or inference_mode (an evaluation loop): the same
    value, and the token-wise forward forms no gradient (inference_mode crashed on it)."""
    hidden, weight, bias, labels = make_batch()
    expected = fused_linear_loss(hidden, weight, labels, case, bias=bias, chunk_size=4)
    formed = []

    def watch(event, details):
        if event == "gradient":
            formed.append(details)

    with mode(), observe_chunks(watch):
        loss = fused_linear_loss(hidden, weight, labels, case, bias=bias, chunk_size=4)
    assert loss.item() == expected.item() and not loss.requires_grad
    assert not formed


def test_an_empty_batch_gives_zero():
    hidden, weight, _, labels = make_batch()
    for b, t in [(0, T), (B, 0)]:
        empty = hidden[:b, :t]
        loss = fused_linear_loss(empty, weight, labels[:b, :t], "generalized_dice")
        assert loss.item() == 0.0
        (grad,) = grads(loss, weight)
        assert torch.all(grad == 0)
        logits = (empty @ weight.T).detach().requires_grad_()
        assert loss_from_logits(logits, labels[:b, :t], "lovasz").item() == 0.0


@pytest.mark.parametrize("absent_weight", ["max", "reference"])
@pytest.mark.parametrize("margin", [10.0, 40.0])
@pytest.mark.parametrize("every_class", [False, True], ids=["some", "every-class"])
def test_generalized_dice_stays_exact_when_predictions_are_confident(
    absent_weight, margin, every_class
):
    """The absent classes' soft count is summed, not taken as |M_b| − Σ_{c∈K_b} P_bc: with
    confident predictions that difference is rounding noise, which the reference weight
    (1e20) made the whole loss (−3e-6 instead of 1.0 at a margin of 40, in float32)."""
    g = torch.Generator().manual_seed(10)
    labels = torch.randint(0, V if every_class else 5, (B, T), generator=g)
    if every_class:  # no class is left outside the batch's
        labels[0, :7], labels[2, :6] = torch.arange(7), torch.arange(7, V)
    labels[1, :] = -100
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    logits.scatter_add_(2, labels.clamp(min=0)[..., None], torch.full((B, T, 1), margin).double())
    case = {"generalized_dice": {"absent_weight": absent_weight}}
    expected = reference_loss(logits.requires_grad_(), labels, normalize_losses(case))
    (expected_grad,) = grads(expected, logits)
    z = logits.detach().float().requires_grad_()
    identity = torch.eye(V)  # the fused path then sees the same logits
    for loss in [
        loss_from_logits(z, labels, case),
        fused_linear_loss(z, identity, labels, case, chunk_size=4),
    ]:
        torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
        if absent_weight == "max" and margin > 10:
            continue  # its gradient (~1e-16) lives in 1 − p, below float32's resolution
        (grad,) = grads(loss, z)
        assert (grad.double() - expected_grad).norm() <= 1e-4 * expected_grad.norm()


@pytest.mark.parametrize("absent_weight", ["max", "reference"])
def test_generalized_dice_with_masked_classes_has_finite_gradients(absent_weight):
    """Classes outside the batch all at −inf (a masked vocabulary): no rest at all, whose
    log-sum-exp gradient was NaN; float64 in, so the reference holds to 1e-10."""
    hidden, weight, bias, labels = make_batch(seed=11)
    labels = labels.clamp(max=5).where(labels != -100, -100)  # classes 0..5 only,
    labels[0, 2:8] = torch.arange(6)  # all of them present
    bias = bias.detach().clone()
    bias[6:] = float("-inf")
    case = {"generalized_dice": {"absent_weight": absent_weight}}
    expected = reference_loss(hidden @ weight.T + bias, labels, normalize_losses(case))
    (expected_grad,) = grads(expected, hidden)
    fused = fused_linear_loss(hidden, weight, labels, case, bias=bias, chunk_size=4)
    torch.testing.assert_close(fused, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grads(fused, hidden)[0], expected_grad, rtol=1e-8, atol=1e-10)
    logits = (hidden @ weight.T + bias).detach().requires_grad_()
    from_logits = loss_from_logits(logits, labels, case)
    torch.testing.assert_close(from_logits, expected, rtol=1e-10, atol=1e-12)
    assert torch.isfinite(grads(from_logits, logits)[0]).all()


def test_a_float64_bias_makes_the_loss_float64():
    hidden, weight, bias, labels = make_batch(dtype=torch.float32)
    loss = fused_linear_loss(hidden, weight, labels, "ce", bias=bias.double(), chunk_size=4)
    assert loss.dtype == torch.float64


def test_custom_ignore_index():
    hidden, weight, _, labels = make_batch()
    relabeled = labels.masked_fill(labels == -100, V + 7)
    mixture = {"cross_entropy": 0.5, "dice": 0.5}
    expected = fused_linear_loss(hidden, weight, labels, mixture)
    actual = fused_linear_loss(hidden, weight, relabeled, mixture, ignore_index=V + 7)
    torch.testing.assert_close(actual, expected)


def test_normalizers_for_gradient_accumulation():
    """Two halves with whole-batch normalizers add up to the whole batch's loss."""
    hidden, weight, _, labels = make_batch()
    mixture = {"cross_entropy": 0.5, "generalized_dice": 0.5}
    whole = fused_linear_loss(hidden, weight, labels, mixture)
    n_tokens = int((labels != -100).sum())
    n_samples = int((labels != -100).any(1).sum())
    halves = [
        fused_linear_loss(
            hidden[s], weight, labels[s], mixture, num_tokens=n_tokens, num_samples=n_samples
        )
        for s in (slice(0, 1), slice(1, 3))
    ]
    torch.testing.assert_close(halves[0] + halves[1], whole)
    loss_fn = FusedLinearLoss(mixture)
    counts = {"num_tokens": n_tokens, "num_samples": n_samples}
    halves = [loss_fn(hidden[s], weight, labels[s], **counts) for s in (slice(0, 1), slice(1, 3))]
    torch.testing.assert_close(halves[0] + halves[1], whole)


def test_fused_linear_loss_module_checks_its_options_when_built():
    with pytest.raises(ValueError, match=r"unknown FusedLinearLoss option\(s\) \['chunksize'\]"):
        FusedLinearLoss("ce", chunksize=64)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        FusedLinearLoss("ce", chunk_size=0)
    with pytest.raises(
        ValueError, match="bias, num_tokens, num_samples and token_weights go to forward"
    ):
        FusedLinearLoss("ce", bias=torch.zeros(V))


def test_fused_linear_loss_module_takes_a_bias_in_its_call():
    """A bias is the model's parameter, so it comes with each call, not at construction."""
    hidden, weight, bias, labels = make_batch()
    expected = fused_linear_loss(hidden, weight, labels, "focal", bias=bias)
    actual = FusedLinearLoss("focal")(hidden, weight, labels, bias=bias)
    torch.testing.assert_close(actual, expected)


def test_aliases_resolve_to_canonical_names():
    assert available_losses() == [
        "cross_entropy",
        "focal",
        "self_adjusting_dice",
        "generalized_dice",
        "tversky",
        "dice",
        "jaccard",
        "lovasz",
        "z_loss",
    ]
    assert normalize_losses("zloss") == {"z_loss": {"weight": 1.0}}
    mixture = normalize_losses({"ce": 1, "gdice": 2, "iou": 3, "self_adj_dice": 4})
    assert list(mixture) == ["cross_entropy", "generalized_dice", "jaccard", "self_adjusting_dice"]
    assert mixture["generalized_dice"] == {"weight": 2.0, "smooth": 1e-5, "absent_weight": "max"}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_half_inputs_give_what_their_float32_upcast_gives(case, dtype):
    """The contract's "upcast chunk by chunk": values and gradients as if the half inputs
    had been cast to float32 first (gradients then rounded to the inputs' dtype), with
    large logits, where rounding half-precision logits would show. A trainable half
    head's gradient is summed over chunks in float32 and rounded once."""
    hidden, weight, bias, labels = make_batch(seed=8)
    hidden, weight = (3 * hidden).to(dtype), weight.to(dtype)
    bias = bias.detach().float().requires_grad_()
    loss = fused_linear_loss(hidden, weight, labels, case, bias=bias, chunk_size=3)
    assert loss.dtype == torch.float32
    up = [t.detach().float().requires_grad_() for t in (hidden, weight, bias)]
    naive = loss_from_logits(up[0] @ up[1].T + up[2], labels, case)
    torch.testing.assert_close(loss, naive, rtol=1e-5, atol=1e-6)
    actual_grads = grads(loss, hidden, weight, bias)
    assert [g.dtype for g in actual_grads] == [dtype, dtype, torch.float32]
    inputs = (hidden, weight, bias)
    expected_grads = [g.to(t.dtype) for g, t in zip(grads(naive, *up), inputs, strict=True)]
    assert_close(actual_grads, expected_grads, rtol=1e-2, atol=1e-5)


@pytest.mark.parametrize("case", ["cross_entropy", "lovasz"])
def test_a_float64_bias_on_a_half_head(case):
    """The bias sets float64 accumulation; the half head's gradient is still summed in
    float32 (a mixed-dtype matmul there once crashed)."""
    hidden, weight, bias, labels = make_batch(seed=10)
    hidden, weight = hidden.to(torch.bfloat16), weight.to(torch.bfloat16)
    loss = fused_linear_loss(hidden, weight, labels, case, bias=bias, chunk_size=3)
    assert loss.dtype == torch.float64
    up = [t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    naive = loss_from_logits(up[0] @ up[1].T + up[2], labels, case)
    torch.testing.assert_close(loss, naive)
    inputs = (hidden, weight, bias)
    expected = [g.to(t.dtype) for g, t in zip(grads(naive, *up), inputs, strict=True)]
    assert_close(grads(loss, *inputs), expected, rtol=1e-2, atol=1e-5)


def test_half_head_products_are_upcast_in_blocks(monkeypatch):
    """Heads larger than one upcast block are walked block by block, same result."""
    from qseg.losses import engine

    hidden, weight, _, labels = make_batch(seed=9, dtype=torch.bfloat16)
    mixture = {"cross_entropy": 0.5, "generalized_dice": 0.5}
    whole = fused_linear_loss(hidden, weight, labels, mixture, chunk_size=4)
    whole_grads = grads(whole, hidden, weight)
    block_rows = 4  # 13 rows: blocks of 4, 4, 4 and 1
    monkeypatch.setattr(engine, "UPCAST_BLOCK_BYTES", 4 * weight.shape[1] * block_rows)
    assert weight.shape[0] % block_rows != 0
    blocked = fused_linear_loss(hidden, weight, labels, mixture, chunk_size=4)
    assert_close([blocked, *grads(blocked, hidden, weight)], [whole, *whole_grads])


# Exponents below 1: (1 - p)^γ has an infinite slope where p rounds to 1.
FRACTIONAL = [{"focal": {"gamma": 0.5}}, {"self_adjusting_dice": {"alpha": 0.25}}]


@pytest.mark.parametrize("losses", [*available_losses(), *FRACTIONAL], ids=case_id)
def test_huge_logits_stay_finite(losses):
    hidden, weight, _, labels = make_batch(dtype=torch.float32, scale=3e3)
    loss = fused_linear_loss(hidden, weight, labels, losses, chunk_size=7)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(hidden.grad).all()
    assert torch.isfinite(weight.grad).all()
    logits = (hidden @ weight.T).detach().requires_grad_()
    loss_from_logits(logits, labels, losses).backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("absent_weight", ["max", "reference", "zero"])
def test_generalized_dice_gradients_stay_finite_at_extreme_logits(absent_weight):
    """The rest of the vocabulary's log-sum-exp is kept whole for the backward: rebuilt from
    log p + lse it loses its low digits at logits of 1e10 and exp(z − lse_rest) overflows."""
    g = torch.Generator().manual_seed(0)
    logits = (1e10 * torch.randn(2, 6, 9, generator=g)).requires_grad_()
    labels = torch.randint(0, 9, (2, 6), generator=g)
    losses = {"generalized_dice": {"absent_weight": absent_weight}}
    loss = fused_linear_loss(logits, torch.eye(9), labels, losses, chunk_size=5)
    (grad,) = grads(loss, logits)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


@pytest.mark.parametrize("losses", ["cross_entropy", "generalized_dice", "lovasz"])
def test_double_backward_is_a_clear_error(losses):
    """Gradients through the gradient (create_graph=True) would silently lack the second
    order: refused, pointing to loss_from_logits."""
    hidden, weight, _, labels = make_batch()
    loss = fused_linear_loss(hidden, weight, labels, losses, chunk_size=7)
    with pytest.raises(RuntimeError, match="no second derivative.*loss_from_logits"):
        torch.autograd.grad(loss, hidden, create_graph=True)
    # loss_from_logits has one, for the penalty the message suggests.
    penalty = loss_from_logits(hidden @ weight.T, labels, losses)
    (grad,) = torch.autograd.grad(penalty, hidden, create_graph=True)
    grad.square().sum().backward()
    assert torch.isfinite(weight.grad).all() and weight.grad.abs().sum() > 0


def test_reusing_a_token_wise_graph_after_its_gradients_changed_is_a_clear_error():
    """The buffers autograd adopts as .grad are the ones the graph keeps: a second backward
    (retain_graph) accumulates into them, and a third must say what happened."""
    hidden, weight, _, labels = make_batch(dtype=torch.float32)
    loss = fused_linear_loss(hidden, weight, labels, "cross_entropy", chunk_size=7)
    loss.backward(retain_graph=True)
    once = weight.grad.clone()
    loss.backward(retain_graph=True)
    torch.testing.assert_close(weight.grad, 2 * once)
    with pytest.raises(RuntimeError, match="compute the loss again for each backward"):
        loss.backward()


@pytest.mark.parametrize("grad", [True, False], ids=["train", "no_grad"])
@pytest.mark.parametrize("case", ["focal", "lovasz", "generalized_dice"])
def test_one_chunk_of_logits_is_alive_at_a_time(case, grad, monkeypatch):
    """Each (chunk, V) buffer is freed before the next one is made, in the forward and in
    the backward: the chunk memory the tuner plans for is one buffer, not two."""
    from qseg.losses import engine

    make, alive_before = engine.chunk_logits, []

    def tracked(*args):
        alive_before.append(sum(ref() is not None for ref in buffers))
        logits = make(*args)
        buffers.append(weakref.ref(logits))
        return logits

    buffers: list = []
    monkeypatch.setattr(engine, "chunk_logits", tracked)
    hidden, weight, _, labels = make_batch(dtype=torch.float32)
    with torch.set_grad_enabled(grad):
        loss = fused_linear_loss(hidden, weight, labels, case, chunk_size=4)
        if grad:
            loss.backward()
    assert len(alive_before) >= 3 and max(alive_before) == 0, alive_before


@pytest.mark.parametrize("case", ["focal", "lovasz"])
def test_gathered_rows_take_their_own_gradient(case, monkeypatch):
    """Where positions are ignored, a chunk gathers its scored hidden rows into a (rows, d)
    buffer; once the weight gradient has used them, that buffer takes the rows' gradient,
    so no second (rows, d) temporary is made. The gradient stays exact."""
    gathered = []

    def watch(event, details):
        if event == "gather":
            gathered.append((details["rows"], details["buffer"]))

    hidden, weight, _, labels = make_batch(dtype=torch.float32)
    with observe_chunks(watch):
        fused_linear_loss(hidden, weight, labels, case, chunk_size=4).backward()
    # The last gather of each chunk is the one its gradient is formed from (region losses
    # gather in the forward too, for the log-probabilities only).
    last = {tuple(rows.tolist()): buffer for rows, buffer in gathered}
    assert len(last) >= 3
    for rows, buffer in last.items():
        torch.testing.assert_close(buffer, hidden.grad.view(-1, D)[list(rows)], rtol=0, atol=0)
    monkeypatch.undo()
    expected = grads(loss_from_logits(hidden @ weight.T, labels, case), hidden, weight)
    assert_close((hidden.grad, weight.grad), expected, rtol=1e-4, atol=1e-6)


def test_plan_never_breaks_its_budget():
    for vocab, dtype, budget in [
        (32000, torch.float32, 50 << 20),
        (128256, torch.bfloat16, 1 << 30),
        (49152, torch.float64, 3 << 20),
    ]:
        plan = plan_chunks(100_000, vocab, 512, dtype, "lovasz", chunk_memory=budget)
        assert plan.rows >= 1 and plan.estimated_bytes <= budget == plan.budget_bytes
        assert plan.estimated_bytes == plan.rows * plan.bytes_per_row
        assert "recompute" in plan.reason
    small = plan_chunks(10, 32000, 64, torch.float32, "ce", chunk_memory=1 << 30)
    assert small.rows == 10 and "fused" in small.reason
    auto = plan_chunks(4096, 32000, 64, torch.float32)
    assert 0 < auto.estimated_bytes <= auto.budget_bytes
    assert {"rows", "reason"} <= set(auto.as_dict())
    with pytest.raises(ValueError, match="cannot hold one row"):
        plan_chunks(10, 32000, 64, torch.float32, chunk_memory=1000)


def test_token_wise_chunks_are_no_larger_than_the_hidden_state_gradient(monkeypatch):
    from qseg.losses import autotune

    monkeypatch.setattr(autotune, "default_budget", lambda device: (1 << 30, "1 GiB (test)"))
    n, vocab, dim = 32768, 32000, 384
    gradient = n * dim * 4  # float32 (n, d)
    token = plan_chunks(n, vocab, dim, torch.float32, {"cross_entropy": 0.5, "focal": 0.5})
    region = plan_chunks(n, vocab, dim, torch.float32, "lovasz")
    assert token.budget_bytes == gradient and "hidden-state gradient" in token.reason
    assert token.estimated_bytes <= gradient < token.estimated_bytes + 16 * token.bytes_per_row
    assert region.budget_bytes == 1 << 30 and region.rows > 2 * token.rows
    # Unscored positions count: their gradient rows are allocated too.
    few_scored = plan_chunks(1000, vocab, dim, torch.float32, "cross_entropy", positions=n)
    assert few_scored.rows == token.rows
    short = plan_chunks(1000, vocab, dim, torch.float32, "cross_entropy")
    assert short.rows == autotune.MIN_TOKEN_ROWS  # 1000 rows' gradient holds 5 rows
    given = plan_chunks(n, vocab, dim, torch.float32, "cross_entropy", chunk_memory=1 << 30)
    assert given.budget_bytes == 1 << 30  # a given budget is taken as it is
    for bad in (999, 1000.0, True):
        with pytest.raises(ValueError, match="positions must be an int of at least"):
            plan_chunks(1000, vocab, dim, torch.float32, "cross_entropy", positions=bad)


def test_token_wise_chunks_at_llama3s_head_stay_level_with_liger(monkeypatch):
    """Issue 5's shape on CUDA (planned only): 8192 positions, 10% ignored, V 128256,
    d 4096, bf16. Liger-Kernel's chunk there is 256 rows of bf16 logits; ours, with its
    gathered hidden rows and their gradient, is planned at 2 bytes per logit and 16 KiB
    per row (the H100 sweep in benchmarks/results/gpu/autotune_gpu.json measured 2.06
    bytes per logit, rows included). It must not be larger, and must take as many rows as
    that allows: fewer, misaligned rows cost time there."""
    from qseg.losses import autotune

    monkeypatch.setattr(autotune, "default_budget", lambda device: (384 << 20, "384 MiB"))
    monkeypatch.setattr(autotune, "uses_compiled_kernels", lambda device: True)
    vocab, dim = 128256, 4096
    plan = plan_chunks(7326, vocab, dim, torch.bfloat16, "focal", device="cuda", positions=8192)
    assert plan.bytes_per_row == 2 * vocab + 2 * dim * 2
    liger_chunk = 256 * vocab * 2
    assert plan.rows == 240 and plan.estimated_bytes <= liger_chunk
    region = plan_chunks(7326, vocab, dim, torch.bfloat16, "lovasz", device="cuda", positions=8192)
    assert region.bytes_per_row == 4 * vocab + 2 * dim * 2  # a margin for its columns
    # A LoRA head's parts or a bias: float32 logits summed beside half products.
    lora = plan_chunks(
        7326, vocab, dim, torch.bfloat16, "focal", device="cuda", positions=8192, plain_head=False
    )
    assert lora.bytes_per_row == 8 * vocab + 2 * dim * 2 and lora.rows < plan.rows


def test_fused_loss_plans_its_chunks_for_every_position_given(monkeypatch):
    from qseg.losses import api

    seen = []
    real = api.plan_chunks

    def spy(*args, **kwargs):
        seen.append((kwargs["positions"], kwargs["plain_head"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "plan_chunks", spy)
    hidden, weight, bias, labels = make_batch()
    labels = labels.clone()
    labels[:, ::2] = -100
    fused_linear_loss(hidden, weight, labels, "cross_entropy")
    fused_linear_loss(hidden, weight, labels, "cross_entropy", bias=bias)
    assert seen == [(labels.numel(), True), (labels.numel(), False)]
    assert (labels != -100).sum() < labels.numel()


def test_auto_chunks_respect_chunk_memory():
    hidden, weight, _, labels = make_batch()
    one_row = plan_chunks(1, V, D, torch.float64, chunk_memory=10**6).bytes_per_row
    expected = fused_linear_loss(hidden, weight, labels, "lovasz", chunk_size=1)
    actual = fused_linear_loss(hidden, weight, labels, "lovasz", chunk_memory=one_row)
    torch.testing.assert_close(actual, expected)


BAD_INPUTS = [
    (dict(losses="dicee"), "unknown loss 'dicee'"),
    (dict(losses={"focal": {"gama": 2}}), "unknown parameter.*gama.*allowed"),
    (dict(losses={"focal": -1.0}), "weight of 'focal' must be finite and >= 0"),
    (dict(losses={"focal": math.nan}), "must be finite"),
    (dict(losses={"focal": math.inf}), "must be finite"),
    (dict(losses={"generalized_dice": {"absent_weight": "min"}}), "max, reference, zero"),
    (dict(losses={"lovasz": {"per_sample": 1}}), "true or false"),
    (dict(losses={}), "non-empty"),
    (dict(labels_value=V), r"\[0, 13\).*found 13"),
    (dict(labels_value=-3), "found -3"),
    (dict(labels_dtype=torch.float32), "integer tensor"),
    (dict(labels_shape=(B, T + 1)), "does not line up"),
    (dict(labels_as_list=True), "labels must be a torch.Tensor; got list"),
    (dict(weight_shape=(V, D + 1)), "does not match the head"),
    (dict(weight_dtype=torch.long), r"weight must be a 2-D \(V, d\) floating-point tensor"),
    (dict(bias_shape=(V + 1,)), r"bias must be a floating-point tensor of shape \(13,\)"),
    (dict(bias_dtype=torch.long), "bias must be a floating-point tensor"),
    (dict(fused=dict(chunk_size=0)), "chunk_size must be a positive int"),
    (dict(fused=dict(chunk_memory=0.5)), "chunk_memory must be a positive number of bytes"),
    (dict(both=dict(ignore_index=None)), "ignore_index must be an int"),
    (dict(both=dict(num_tokens=3)), "num_tokens must be None or an int at least the 11 valid"),
    (dict(both=dict(num_tokens=-1)), "num_tokens must be"),
    (dict(both=dict(num_samples=0)), "num_samples must be None or an int at least the 2"),
    (dict(both=dict(num_samples=2.5)), "num_samples must be"),
]


@pytest.mark.parametrize("bad,message", BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_input_raises_a_clear_value_error(bad, message):
    hidden, weight, bias, labels = make_batch()
    if "labels_value" in bad:
        labels = labels.clone()
        labels[0, 5] = bad["labels_value"]
    if "labels_dtype" in bad:
        labels = labels.to(bad["labels_dtype"])
    if "labels_shape" in bad:
        labels = torch.zeros(bad["labels_shape"], dtype=torch.long)
    if "labels_as_list" in bad:
        labels = labels.tolist()
    if "weight_shape" in bad:
        weight = torch.randn(bad["weight_shape"], dtype=torch.float64)
    if "weight_dtype" in bad:
        weight = weight.detach().to(bad["weight_dtype"])
    if "bias_shape" in bad:
        bias = torch.randn(bad["bias_shape"], dtype=torch.float64)
    if "bias_dtype" in bad:
        bias = bias.detach().to(bad["bias_dtype"])
    losses = bad.get("losses", "cross_entropy")
    both = bad.get("both", {})
    with pytest.raises(ValueError, match=message):
        fused_linear_loss(hidden, weight, labels, losses, bias=bias, **both, **bad.get("fused", {}))
    if not {"weight_shape", "weight_dtype", "bias_shape", "bias_dtype", "fused"} & set(bad):
        with pytest.raises(ValueError, match=message):
            loss_from_logits(hidden @ weight.T, labels, losses, **both)


@pytest.mark.parametrize("losses", ["cross_entropy", {"focal": 1.0, "generalized_dice": 0.5}])
def test_normalizers_count_the_whole_batch(losses):
    """num_tokens / num_samples as large as this batch's own counts change nothing; numpy
    numbers and integer tensors are taken as ints."""
    hidden, weight, _, labels = make_batch()
    expected = fused_linear_loss(hidden, weight, labels, losses, chunk_size=5)
    counts = dict(num_tokens=torch.tensor(11), num_samples=np.int64(2))
    actual = fused_linear_loss(hidden, weight, labels, losses, chunk_size=np.int64(5), **counts)
    torch.testing.assert_close(actual, expected)
    halved = fused_linear_loss(hidden, weight, labels, losses, num_tokens=22, num_samples=4)
    torch.testing.assert_close(halved, expected / 2)
    numpy_weights = {"cross_entropy": np.float32(0.5), "focal": {"weight": np.float64(0.5)}}
    mixed = fused_linear_loss(hidden, weight, labels, numpy_weights, chunk_memory=1e6)
    torch.testing.assert_close(mixed, fused_linear_loss(hidden, weight, labels, numpy_weights))


def test_lovasz_blocks_of_classes_match_one_block(monkeypatch):
    """Many present classes: the checkpointed column blocks give the same value and grads."""
    from qseg.losses import functional

    hidden, weight, _, labels = make_batch(seed=3)
    case = {"lovasz": {"per_sample": True}, "dice": 0.5}
    whole = fused_linear_loss(hidden, weight, labels, case)
    expected = grads(whole, hidden, weight)
    monkeypatch.setattr(functional, "LOVASZ_BLOCK_ENTRIES", 2 * T)
    blocked = fused_linear_loss(hidden, weight, labels, case)
    torch.testing.assert_close(blocked, whole)
    assert_close(grads(blocked, hidden, weight), expected)
    monkeypatch.setattr(functional, "LOVASZ_BLOCK_ENTRIES", 1)  # one class per block
    one_class_blocks = fused_linear_loss(hidden, weight, labels, "lovasz")
    reference = reference_loss(hidden @ weight.T, labels, normalize_losses("lovasz"))
    torch.testing.assert_close(one_class_blocks, reference)


@pytest.mark.parametrize("block_entries", [1 << 22, 1])
@pytest.mark.parametrize("per_sample", [False, True])
def test_lovasz_gradient_penalty_matches_the_reference(per_sample, block_entries, monkeypatch):
    """Lovász forms its gradient in the forward; its backward stays differentiable, so a
    gradient penalty through loss_from_logits gets autograd's second order (the reference
    differentiates twice through the sort)."""
    from qseg.losses import functional

    monkeypatch.setattr(functional, "LOVASZ_BLOCK_ENTRIES", block_entries)
    hidden, weight, _, labels = make_batch(seed=4)
    losses = {"lovasz": {"per_sample": per_sample}}
    results = []
    for compute in (loss_from_logits, reference_loss):
        logits = (hidden @ weight.T).detach().requires_grad_()
        loss = compute(logits, labels, normalize_losses(losses))
        (grad,) = torch.autograd.grad(loss, logits, create_graph=True)
        (second,) = torch.autograd.grad(grad.square().sum(), logits)
        results.append([loss, grad, second])
    assert_close(results[0], results[1])


@pytest.mark.parametrize("per_sample", [False, True])
def test_lovasz_with_confident_predictions_matches_the_reference(per_sample):
    """Lovász sorts only the background tokens whose error reaches their class's smallest
    foreground error (after those ΔJ is 0): with confident predictions many are kept
    and many left out, and the loss and gradient still match the dense reference."""
    g = torch.Generator().manual_seed(8)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[1, :4] = -100
    logits = 6 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    # Some tokens confidently right, so that their class's smallest foreground error is
    # small and confident wrong guesses for that class rank above it.
    logits[0].scatter_add_(1, labels[0][:, None], torch.full((T, 1), 12.0, dtype=torch.float64))
    probs = logits.softmax(-1).reshape(-1, V)
    valid = labels.reshape(-1) != -100
    fg = torch.nn.functional.one_hot(labels.reshape(-1).clamp(min=0), V).bool() & valid[:, None]
    least_fg = torch.where(fg, 1 - probs, torch.inf).amin(0)
    kept_bg = (~fg & valid[:, None] & (probs >= least_fg)).sum()
    assert 0 < kept_bg < (~fg & valid[:, None]).sum() / 2
    losses = {"lovasz": {"per_sample": per_sample}}
    results = []
    for compute in (loss_from_logits, reference_loss):
        leaf = logits.clone().requires_grad_()
        loss = compute(leaf, labels, normalize_losses(losses))
        results.append([loss, *torch.autograd.grad(loss, leaf)])
    assert_close(results[0], results[1])
