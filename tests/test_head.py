"""qseg.losses.head: every head kind gives the loss and gradients of its own forward.

Each test compares fused_linear_loss(hidden, head, ...) with loss_from_logits(head(hidden),
...): the values, and the gradients of the hidden states and of every trainable parameter.
"""

import pytest
import torch
from torch import nn

from qseg.losses import fused_linear_loss, loss_from_logits
from qseg.losses.head import linear_parts

B, T, D, V = 2, 7, 16, 40
CASES = ["cross_entropy", {"cross_entropy": 0.6, "generalized_dice": 0.4}]


def make_batch(d: int = D, vocab: int = V) -> tuple[torch.Tensor, torch.Tensor]:
    hidden = torch.randn(B, T, d, requires_grad=True)
    labels = torch.randint(0, vocab, (B, T))
    labels[0, :2] = -100
    return hidden, labels


def grads(loss: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(loss, tensors, retain_graph=True)


def assert_same_loss(
    head: nn.Module, case, params: list[torch.Tensor], forward=None, loose: bool = False
) -> None:
    """Fused and naive losses agree in value and in the gradients of hidden and `params`;
    the naive logits are `forward`'s (default: the head's own), `loose`ly: to 1%."""
    forward = forward or head
    hidden, labels = make_batch()
    fused = fused_linear_loss(hidden, head, labels, case, chunk_size=5)
    # (B·T, d) rows: bitsandbytes' 8-bit backward cannot take (B, T, d) hidden states.
    naive = loss_from_logits(forward(hidden.reshape(B * T, D)).reshape(B, T, V), labels, case)
    tol = {"rtol": 1e-2, "atol": 1e-4} if loose else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(fused, naive, **tol)
    tol = {"rtol": 1e-2, "atol": 1e-4} if loose else {"rtol": 1e-4, "atol": 1e-6}
    for f, n in zip(grads(fused, hidden, *params), grads(naive, hidden, *params), strict=True):
        torch.testing.assert_close(f, n, **tol)


def lora_head(bias: bool = False, **options) -> nn.Module:
    """A peft LoRA-wrapped (D -> V) lm_head, its adapter weights random (not B = 0)."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = nn.Module()
    model.lm_head = nn.Linear(D, V, bias=bias)
    config = peft.LoraConfig(target_modules=["lm_head"], r=4, init_lora_weights=False, **options)
    return peft.inject_adapter_in_model(config, model).lm_head


# --- nn.Linear, LoRA, bitsandbytes 4-bit -----------------------------------------------


def test_linear_with_bias_and_frozen_weight():
    head = nn.Linear(D, V)
    head.weight.requires_grad_(False)
    assert_same_loss(head, {"focal": 0.5, "dice": 0.5}, [head.bias])


@pytest.mark.parametrize("case", CASES)
def test_lora_head_gradients_reach_the_adapter(case):
    head = lora_head(lora_alpha=8)
    assert not head.base_layer.weight.requires_grad
    assert_same_loss(head, case, [head.lora_A["default"].weight, head.lora_B["default"].weight])


@pytest.mark.parametrize("case", CASES)
def test_4bit_head_matches_its_dequantized_forward(case):
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    dense = nn.Linear(D, V)
    head = bnb.nn.Linear4bit(D, V, compute_dtype=torch.float32, quant_type="nf4")
    head.load_state_dict(dense.state_dict())
    head = head.to("cpu")  # quantizes the weight
    assert_same_loss(head, case, [head.bias])


# --- bitsandbytes 4-bit after an eval-mode pass ------------------------------------------


def _bf16_absmax_weight(bnbf, data: torch.Tensor, state) -> torch.Tensor:
    """The weight a CPU-repacked 4-bit layer multiplies by: its codes times its absmax
    rounded to bf16 (nested absmax dequantized first), computed from the unpacked state."""
    absmax = state.absmax
    if state.nested:
        absmax = bnbf.dequantize_blockwise(absmax, state.state2) + state.offset
    plain = bnbf.QuantState(
        absmax=absmax.float().to(torch.bfloat16).float(),
        shape=state.shape,
        code=state.code,
        blocksize=state.blocksize,
        quant_type=state.quant_type,
        dtype=state.dtype,
    )
    return bnbf.dequantize_4bit(data, plain)


@pytest.mark.parametrize("nested", [False, True])
def test_4bit_head_after_an_eval_no_grad_forward(nested):
    """On a CPU with AVX512-BF16, an eval-mode forward without grad repacks the layer for
    inference; the head must still give the weight bitsandbytes multiplies by, and the
    layer must stay as bitsandbytes left it."""
    bnb = pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnbf

    if not hasattr(bnbf, "_convert_weight_packed_for_cpu"):
        pytest.skip(f"bitsandbytes {bnb.__version__} never repacks 4-bit weights for CPU")
    torch.manual_seed(0)
    d, vocab = 128, 512  # two absmax blocks per row: the packed absmax layout matters
    head = bnb.nn.Linear4bit(
        d, vocab, bias=False, compute_dtype=torch.float32, quant_type="nf4",
        compress_statistics=nested,
    )  # fmt: skip
    head.weight = bnb.nn.Params4bit(
        torch.randn(vocab, d) * 0.1, requires_grad=False, quant_type="nf4",
        compress_statistics=nested,
    )  # fmt: skip
    head = head.to("cpu")  # quantizes
    expected = _bf16_absmax_weight(bnbf, head.weight.data, head.weight.quant_state)
    hidden, labels = make_batch(d, vocab)
    head.eval()
    with torch.no_grad():
        head(hidden.detach())  # e.g. a validation pass or generate()
    head.train()
    repacked = getattr(head.weight.quant_state, "packing_format_for_cpu", False)
    if not repacked:  # no AVX512-BF16 here: repack as that forward would, to check the rest
        head.weight.data, head.weight.quant_state = bnbf._convert_weight_packed_for_cpu(
            head.weight.data, head.weight.quant_state
        )
    state = head.weight.quant_state
    packed, absmax = head.weight.data.clone(), state.absmax.clone()

    weight = linear_parts(head, hidden.detach().reshape(-1, d))[1][0]
    torch.testing.assert_close(weight, expected, rtol=1e-6, atol=1e-7)
    assert state.packing_format_for_cpu and head.weight.quant_state is state
    assert torch.equal(head.weight.data, packed) and torch.equal(state.absmax, absmax)

    case = {"cross_entropy": 0.6, "generalized_dice": 0.4}
    fused = fused_linear_loss(hidden, head, labels, case, chunk_size=5)
    if repacked:  # its repacked forward needs AVX512-BF16, computes in bf16, passes no grad
        with torch.no_grad():
            own = loss_from_logits(head(hidden), labels, case)
        torch.testing.assert_close(fused, own, rtol=0, atol=5e-3)
    naive = loss_from_logits(hidden @ expected.T, labels, case)
    torch.testing.assert_close(fused, naive, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads(fused, hidden)[0], grads(naive, hidden)[0])


# --- bitsandbytes 8-bit --------------------------------------------------------------------


def _int8_head(has_fp16_weights: bool) -> nn.Module:
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    dense = nn.Linear(D, V)
    head = bnb.nn.Linear8bitLt(D, V, has_fp16_weights=has_fp16_weights)
    head.load_state_dict(dense.state_dict())
    return head.to("cpu").train()  # quantizes an int8 head; training-mode forward


def _own_forward_runs(head: nn.Module) -> bool:
    """Whether bitsandbytes' own 8-bit forward runs on this CPU (not before 0.47 or so)."""
    try:
        head(torch.zeros(1, D))
    except NotImplementedError:
        return False
    return True


@pytest.mark.parametrize("case", CASES)
def test_int8_head_is_dequantized_with_its_scales(case):
    head = _int8_head(has_fp16_weights=False)
    assert head.weight.dtype == torch.int8 and not head.weight.requires_grad
    assert head.weight.SCB is not None  # before the first forward: scales on the weight
    dense = head.weight.float() * head.weight.SCB[:, None] / 127
    assert_same_loss(head, case, [head.bias], forward=lambda x: x @ dense.T + head.bias)
    if not _own_forward_runs(head):
        pytest.skip("bitsandbytes' own 8-bit forward does not run on this CPU")
    assert head.weight.SCB is None  # after it: on head.state
    assert_same_loss(head, case, [head.bias], forward=lambda x: x @ dense.T + head.bias)
    # Older bitsandbytes quantize the activations too, which no dense weight reproduces.
    assert_same_loss(head, case, [head.bias], loose=True)


@pytest.mark.parametrize("case", CASES)
def test_int8_head_with_a_float_weight_trains_it(case):
    """has_fp16_weights=True: bitsandbytes multiplies by the weight's int8 round trip and
    passes the gradient straight through to the float weight."""
    head = _int8_head(has_fp16_weights=True)
    assert head.weight.is_floating_point() and head.weight.requires_grad
    if not _own_forward_runs(head):
        pytest.skip("bitsandbytes' own 8-bit forward does not run on this CPU")
    assert_same_loss(head, case, [head.weight, head.bias])


# --- peft LoRA with lora_bias --------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:`lora_bias=True` was passed")  # a bias-free base
@pytest.mark.parametrize("base_bias", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_lora_bias_adds_scaled_bias_and_gets_its_gradient(base_bias, case):
    head = lora_head(bias=base_bias, lora_alpha=12, lora_bias=True)
    lora_a, lora_b = head.lora_A["default"], head.lora_B["default"]
    with torch.no_grad():
        lora_b.bias.normal_()  # as after some training
    assert head.scaling["default"] != 1
    assert_same_loss(head, case, [lora_a.weight, lora_b.weight, lora_b.bias])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_lora_head_gives_its_float32_upcast(dtype):
    """Off CUDA half products are formed in float32, the adapter's down-projection too:
    in fp16 it overflowed (loss NaN) where the float32 upcast is finite."""
    head = lora_head(lora_alpha=6)
    hidden, labels = make_batch()
    hidden = (hidden.detach() * 3000).clamp(-6e4, 6e4).to(dtype)
    half = fused_linear_loss(hidden, head.to(dtype), labels, "cross_entropy", chunk_size=5)
    upcast = fused_linear_loss(hidden.float(), head.float(), labels, "cross_entropy", chunk_size=5)
    assert torch.isfinite(upcast)
    torch.testing.assert_close(half, upcast, rtol=1e-6, atol=0)


def test_cpu_autocast_leaves_a_lora_head_in_float32():
    head = lora_head(bias=True)
    hidden, labels = make_batch()
    expected = fused_linear_loss(hidden, head, labels, CASES[1], chunk_size=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        actual = fused_linear_loss(hidden, head, labels, CASES[1], chunk_size=5)
    assert actual.item() == expected.item()


# --- peft modules_to_save and trainable_token_indices --------------------------------------


@pytest.mark.parametrize("enabled", [True, False])
def test_modules_to_save_head_uses_the_copy_its_forward_runs(enabled):
    pytest.importorskip("peft")
    from peft.utils import ModulesToSaveWrapper

    torch.manual_seed(0)
    head = ModulesToSaveWrapper(nn.Linear(D, V), "default")
    copy = head.modules_to_save["default"]
    with torch.no_grad():
        copy.weight.add_(torch.randn_like(copy.weight))  # the copy has been trained
    head.enable_adapters(enabled)
    active = copy if enabled else head.original_module
    params = [p for p in active.parameters() if p.requires_grad]
    assert_same_loss(head, CASES[1], params)


def test_trainable_tokens_head_is_refused_with_what_to_pass_instead():
    pytest.importorskip("peft")
    from peft.utils import TrainableTokensWrapper

    torch.manual_seed(0)
    head = TrainableTokensWrapper(nn.Linear(D, V, bias=False), "default", token_indices=[1, 3])
    delta = head.token_adapter.trainable_tokens_delta["default"]
    with torch.no_grad():
        delta.add_(torch.randn_like(delta))
    hidden, labels = make_batch()
    with pytest.raises(ValueError, match="head.weight"):
        fused_linear_loss(hidden, head, labels, "cross_entropy")
    # What the message suggests gives the head's loss, and the tokens their gradient.
    fused = fused_linear_loss(hidden, head.weight, labels, "cross_entropy", chunk_size=5)
    naive = loss_from_logits(head(hidden), labels, "cross_entropy")
    torch.testing.assert_close(fused, naive)
    for f, n in zip(grads(fused, hidden, delta), grads(naive, hidden, delta), strict=True):
        torch.testing.assert_close(f, n, rtol=1e-4, atol=1e-6)


def test_other_peft_tuners_on_the_head_are_refused():
    peft = pytest.importorskip("peft")
    model = nn.Module()
    model.lm_head = nn.Linear(D, V)
    config = peft.IA3Config(target_modules=["lm_head"], feedforward_modules=[])
    head = peft.inject_adapter_in_model(config, model).lm_head
    hidden, labels = make_batch()
    with pytest.raises(ValueError, match="LoRA"):
        fused_linear_loss(hidden, head, labels, "cross_entropy")
