"""Offloaded checkpointing: each decoder layer's input waits in CPU memory, and training
gives exactly the gradients of plain checkpointing (dropout replayed)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama
from peft import LoraConfig, get_peft_model

from qseg.models import CHECKPOINTING_KWARGS
from qseg.models.offload import enable_offloaded_checkpointing, offloaded_checkpoint


def lora_model(offload: bool):
    model = get_peft_model(
        make_tiny_llama(60),
        LoraConfig(r=4, lora_dropout=0.3, target_modules=["q_proj", "v_proj", "down_proj"]),
    )
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=CHECKPOINTING_KWARGS)
    layers = enable_offloaded_checkpointing(model) if offload else 0
    model.train()
    return model, layers


def lora_grads(model, seed: int = 3):
    torch.manual_seed(seed)
    ids = torch.randint(3, 60, (2, 12), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_offloaded_checkpointing_gives_the_gradients_of_plain_checkpointing():
    plain, _ = lora_model(offload=False)
    offloaded, layers = lora_model(offload=True)
    assert layers == 2
    loss, expected = lora_grads(plain)
    offloaded_loss, got = lora_grads(offloaded)
    torch.testing.assert_close(offloaded_loss, loss, rtol=0, atol=0)
    assert got.keys() == expected.keys() and all(g is not None for g in got.values())
    for name, grad in got.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-6, atol=1e-7, msg=name)


def test_the_layer_input_is_kept_off_the_graph_and_the_layer_recomputed():
    calls = []
    layer = torch.nn.Linear(4, 4)
    layer.register_forward_hook(lambda module, args, out: calls.append(torch.is_grad_enabled()))
    hidden = torch.randn(3, 4, requires_grad=True)
    out = offloaded_checkpoint(layer, hidden)
    assert calls == [False]  # the forward keeps no activations
    out.sum().backward()
    assert calls == [False, True]  # the backward recomputes the layer
    torch.testing.assert_close(hidden.grad, layer.weight.sum(0).expand(3, 4))
    assert layer.weight.grad is not None


@pytest.mark.parametrize("grad", [False, True])
def test_without_gradients_the_layer_just_runs(grad):
    layer = torch.nn.Linear(4, 4)
    with torch.set_grad_enabled(grad):
        out = offloaded_checkpoint(layer, torch.randn(2, 4))
    assert out.requires_grad == grad


def test_the_flag_needs_gradient_checkpointing():
    from qseg.config import resolve_config

    assert resolve_config({"offload_activations": True}).offload_activations is True
    with pytest.raises(ValueError, match="offload-activations offloads the inputs"):
        resolve_config({"offload_activations": True, "gradient_checkpointing": False})


def test_on_a_cpu_nothing_is_offloaded(tiny_llama_dir, caplog):
    from qseg.models import describe, load_model

    loaded = load_model(str(tiny_llama_dir), quantization="none", offload_activations=True)
    assert loaded.offloaded_layers == 0 and describe(loaded)["offloaded_layers"] == 0
    assert "no GPU, so nothing to offload" in caplog.text
