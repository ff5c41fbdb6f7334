"""The loss options (soft-capped and scaled logits, reductions, token weights, label
smoothing, z-loss, statistics) against the float64 full-logits reference."""

import pytest
import torch
import torch.nn.functional as F
from loss_reference import reference_loss
from test_losses import B, T, V, make_batch
from transformers import Gemma2Config, Gemma2ForCausalLM

import qseg
from qseg.losses import FusedLinearLoss, fused_linear_loss, loss_from_logits, normalize_losses
from qseg.models import backbone_hidden_states, logit_options

REFERENCE_OPTIONS = {"logit_softcap": "softcap", "logit_scale": "scale"}

# (mixture, options): each option alone, and with a region loss where that is allowed.
CASES = [
    ("cross_entropy", {"logit_softcap": 1.5}),
    ({"cross_entropy": 0.6, "generalized_dice": 0.4}, {"logit_softcap": 1.5}),
    ({"focal": 1.0, "lovasz": 0.5}, {"logit_softcap": 2.0, "logit_scale": 0.7}),
    ("self_adjusting_dice", {"logit_scale": 3.0}),
    ({"cross_entropy": 0.5, "tversky": 0.5}, {"logit_scale": 0.25}),
    ({"cross_entropy": {"label_smoothing": 0.1}}, {}),
    ({"cross_entropy": {"label_smoothing": 0.3}, "dice": 0.5}, {}),
    ({"cross_entropy": {"label_smoothing": 0.2}, "gdice": 0.5}, {"logit_softcap": 1.0}),
    ("z_loss", {}),
    ({"cross_entropy": 1.0, "zloss": 0.1}, {}),
    ({"z_loss": 0.1, "jaccard": 1.0}, {"logit_softcap": 1.5}),
    ({"z_loss": 0.1, "lovasz": {"per_sample": True}}, {"logit_scale": 0.5}),
    ("focal", {"token_weights": True}),
    ({"cross_entropy": {"label_smoothing": 0.1}, "z_loss": 0.05}, {"token_weights": True}),
    ("cross_entropy", {"token_weights": True, "logit_softcap": 1.5}),
    ("focal", {"reduction": "sum"}),
    ({"cross_entropy": 0.6, "generalized_dice": 0.4}, {"reduction": "sum"}),
    ({"cross_entropy": 1, "z_loss": 0.1}, {"reduction": "sum", "token_weights": True}),
    ("cross_entropy", {"reduction": "none"}),
    ({"cross_entropy": {"label_smoothing": 0.1}, "z_loss": 0.1}, {"reduction": "none"}),
    ("focal", {"reduction": "none", "token_weights": True, "logit_softcap": 1.5}),
    ("generalized_dice", {"reduction": "none"}),
    ({"dice": 0.5, "lovasz": {"per_sample": True}}, {"reduction": "none", "logit_scale": 2.0}),
]


def case_id(case):
    mixture, options = case
    name = mixture if isinstance(mixture, str) else "+".join(mixture)
    return f"{name}-{'-'.join(f'{k}={v}' for k, v in options.items())}"


def with_weights(options, labels):
    """The options with token weights drawn for `labels` where asked (True)."""
    options = dict(options)
    if options.get("token_weights"):
        g = torch.Generator().manual_seed(3)
        options["token_weights"] = torch.rand(labels.shape, generator=g, dtype=torch.float64) * 2
    return options


def reference(logits, labels, mixture, options):
    kwargs = {REFERENCE_OPTIONS.get(k, k): v for k, v in options.items()}
    return reference_loss(logits, labels, normalize_losses(mixture), **kwargs)


def backward(loss, upstream_seed=5):
    """Backward with a random upstream gradient for unreduced losses."""
    if loss.dim() == 0:
        loss.backward()
    else:
        g = torch.Generator().manual_seed(upstream_seed)
        loss.backward(torch.rand(loss.shape, generator=g, dtype=loss.dtype))


def grads(*tensors):
    out = [t.grad.clone() for t in tensors]
    for t in tensors:
        t.grad = None
    return out


@pytest.mark.parametrize("chunk_size", [1, 5, "auto"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_fused_loss_matches_the_float64_reference(case, chunk_size):
    mixture, options = case
    hidden, weight, bias, labels = make_batch()
    options = with_weights(options, labels)
    expected = reference(hidden @ weight.T + bias, labels, mixture, options)
    backward(expected)
    want = grads(hidden, weight, bias)
    actual = fused_linear_loss(
        hidden, weight, labels, mixture, bias=bias, chunk_size=chunk_size, **options
    )
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected)
    backward(actual)
    for got, ref in zip(grads(hidden, weight, bias), want, strict=True):
        torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_loss_from_logits_matches_the_float64_reference(case):
    mixture, options = case
    hidden, weight, bias, labels = make_batch()
    options = with_weights(options, labels)
    logits = (hidden @ weight.T + bias).detach().requires_grad_()
    expected = reference(logits, labels, mixture, options)
    backward(expected)
    (want,) = grads(logits)
    actual = loss_from_logits(logits, labels, mixture, **options)
    torch.testing.assert_close(actual, expected)
    backward(actual)
    torch.testing.assert_close(grads(logits)[0], want)


def test_reduction_none_is_zero_where_ignored_and_for_empty_samples():
    hidden, weight, _, labels = make_batch()
    per_token = fused_linear_loss(hidden, weight, labels, "cross_entropy", reduction="none")
    assert per_token.shape == labels.shape and (per_token[labels == -100] == 0).all()
    per_sample = fused_linear_loss(hidden, weight, labels, "dice", reduction="none")
    assert per_sample.shape == (B,) and per_sample[1] == 0  # sample 1 has no valid token
    mean = fused_linear_loss(hidden, weight, labels, "cross_entropy")
    torch.testing.assert_close(per_token.sum() / (labels != -100).sum(), mean)


def test_token_weights_divide_by_the_scored_tokens_not_the_weights():
    hidden, weight, _, labels = make_batch()
    ones = torch.ones(labels.shape, dtype=torch.float64)
    plain = fused_linear_loss(hidden, weight, labels, "focal")
    torch.testing.assert_close(
        fused_linear_loss(hidden, weight, labels, "focal", token_weights=ones), plain
    )
    torch.testing.assert_close(
        fused_linear_loss(hidden, weight, labels, "focal", token_weights=3 * ones), 3 * plain
    )


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.7, 1.0])
@pytest.mark.parametrize("chunk_size", [1, 5, "auto"])
def test_label_smoothing_is_torch_cross_entropy(smoothing, chunk_size):
    hidden, weight, bias, labels = make_batch()
    logits = hidden @ weight.T + bias
    expected = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), label_smoothing=smoothing)
    mixture = {"cross_entropy": {"label_smoothing": smoothing}}
    actual = fused_linear_loss(hidden, weight, labels, mixture, bias=bias, chunk_size=chunk_size)
    torch.testing.assert_close(actual, expected)
    torch.testing.assert_close(loss_from_logits(logits, labels, mixture), expected)


@pytest.mark.parametrize("chunk_size", [1, 5, "auto"])
@pytest.mark.parametrize(
    ("mixture", "options"),
    [("cross_entropy", {}), ({"ce": 0.5, "lovasz": 0.5}, {"logit_softcap": 1.5})],
)
def test_stats_count_argmax_hits_and_mean_entropy(mixture, options, chunk_size):
    hidden, weight, bias, labels = make_batch()
    logits = hidden @ weight.T + bias
    loss, stats = fused_linear_loss(
        hidden, weight, labels, mixture, bias=bias, chunk_size=chunk_size, return_stats=True,
        **options,
    )  # fmt: skip
    valid = labels != -100
    z = logits.detach()[valid]
    if options:
        z = 1.5 * torch.tanh(z / 1.5)
    logp = z.log_softmax(-1)
    assert stats["tokens"] == valid.sum()
    assert stats["correct"] == (z.argmax(-1) == labels[valid]).sum()
    torch.testing.assert_close(stats["entropy"], -(logp.exp() * logp).sum(-1).mean())
    assert not any(value.requires_grad for value in stats.values())
    torch.testing.assert_close(
        loss, fused_linear_loss(hidden, weight, labels, mixture, bias=bias, **options)
    )
    _, from_logits = loss_from_logits(logits, labels, mixture, return_stats=True, **options)
    for key, value in stats.items():
        torch.testing.assert_close(from_logits[key], value)


def test_stats_without_a_valid_token_are_zero():
    hidden, weight, _, labels = make_batch()
    _, stats = fused_linear_loss(
        hidden, weight, torch.full_like(labels, -100), "ce", return_stats=True
    )
    assert stats["tokens"] == 0 and stats["correct"] == 0 and stats["entropy"] == 0


def tiny_gemma2(cap):
    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=V * 5, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, final_logit_softcapping=cap,
    )  # fmt: skip
    model = Gemma2ForCausalLM(config).double()
    with torch.no_grad():  # logits of a few units, where a cap of 0.5 bends them
        model.lm_head.weight.mul_(50)
    return model


@pytest.mark.parametrize("chunk_size", [1, 5, "auto"])
def test_soft_capping_is_a_gemma2_models_own_logits(chunk_size):
    model = tiny_gemma2(cap=0.5)
    ids = torch.randint(0, V * 5, (B, T), generator=torch.Generator().manual_seed(1))
    labels = ids.roll(-1, 1)
    labels[:, -1] = -100
    logits = model(input_ids=ids).logits
    expected = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
    hidden = backbone_hidden_states(model, ids)
    options = logit_options(model.config)
    assert options == {"logit_softcap": 0.5}
    actual = fused_linear_loss(
        hidden, model.lm_head, labels, "ce", chunk_size=chunk_size, **options
    )
    torch.testing.assert_close(actual, expected)
    uncapped = fused_linear_loss(hidden, model.lm_head, labels, "ce", chunk_size=chunk_size)
    assert (uncapped - expected).abs() > 1e-3  # the cap matters at this scale


def test_a_patched_gemma2_model_computes_its_own_loss():
    model = tiny_gemma2(cap=0.5)
    ids = torch.randint(0, V * 5, (B, T), generator=torch.Generator().manual_seed(2))
    expected = model(input_ids=ids, labels=ids).loss
    qseg.patch_model(model, "cross_entropy", chunk_size=4)
    actual = model(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(actual.float(), expected)  # transformers computes in float32


@pytest.mark.parametrize(
    ("mixture", "options", "message"),
    [
        ("ce", {"logit_softcap": 0.0}, r"logit_softcap must be None or a finite number > 0"),
        ("ce", {"logit_softcap": -1.0}, r"logit_softcap must be None or a finite number > 0"),
        ("ce", {"logit_scale": float("inf")}, r"logit_scale must be None or a finite number > 0"),
        ("ce", {"reduction": "avg"}, r"reduction must be one of mean, sum, none"),
        ({"ce": 1, "dice": 1}, {"reduction": "none"}, r"reduction='none'.*one kind at a time"),
        ("lovasz", {"reduction": "none"}, r"per_sample=True"),
        ("ce", {"reduction": "sum", "num_tokens": 100}, r"leave them None"),
        ({"ce": 1, "dice": 1}, {"token_weights": "ones"}, r"region terms \['dice'\]"),
        ("ce", {"token_weights": "wrong shape"}, r"labels' shape \(3, 9\)"),
        ("ce", {"token_weights": "negative"}, r"finite and >= 0"),
        ("ce", {"token_weights": "nan"}, r"finite and >= 0"),
        ({"ce": {"label_smoothing": 1.5}}, {}, r"label_smoothing must be in \[0, 1\]"),
        ({"ce": {"label_smoothing": -0.1}}, {}, r"label_smoothing must be a finite number >= 0"),
        ({"z_loss": -1.0}, {}, r"weight of 'z_loss' must be finite and >= 0"),
    ],
)
def test_bad_options_say_what_is_allowed(mixture, options, message):
    hidden, weight, _, labels = make_batch()
    weights = {
        "ones": torch.ones(labels.shape),
        "wrong shape": torch.ones(B, T + 1),
        "negative": -torch.ones(labels.shape),
        "nan": torch.full(labels.shape, float("nan")),
    }
    options = {k: weights.get(v, v) if k == "token_weights" else v for k, v in options.items()}
    with pytest.raises(ValueError, match=message):
        fused_linear_loss(hidden, weight, labels, mixture, **options)
    with pytest.raises(ValueError, match=message):
        loss_from_logits(hidden @ weight.T, labels, mixture, **options)


def test_the_module_form_takes_the_options():
    hidden, weight, _, labels = make_batch()
    module = FusedLinearLoss("ce", logit_softcap=1.5, reduction="sum", return_stats=True)
    loss, stats = module(hidden, weight, labels)
    torch.testing.assert_close(
        loss, fused_linear_loss(hidden, weight, labels, "ce", logit_softcap=1.5, reduction="sum")
    )
    with pytest.raises(ValueError, match="logit_softcap must be"):
        FusedLinearLoss("ce", logit_softcap=0)
