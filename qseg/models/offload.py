"""Gradient checkpointing that keeps each layer's input in CPU memory until the backward.

Checkpointing already drops a decoder layer's activations and recomputes them in the
backward; what stays on the GPU is each layer's input, (B, T, d) per layer, which is what
limits the context once the loss is chunked. Here that input is copied to pinned CPU
memory (asynchronously, on the current stream) during the forward and brought back for
the layer's recompute, as unsloth's "unsloth" checkpointing and torchtune's activation
offloading do. The recompute replays the forward's random state and autocast, so the
gradients are those of plain checkpointing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel


def _to_host(tensor: Tensor) -> Tensor:
    """A copy in CPU memory: pinned and asynchronous from a GPU."""
    if tensor.device.type != "cuda":
        return tensor.detach().clone()
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor.detach(), non_blocking=True)


class _OffloadedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, run: Callable, hidden: Tensor, *rest: Any) -> Any:
        device = hidden.device
        ctx.run, ctx.rest, ctx.device = run, rest, device
        ctx.autocast = (
            torch.is_autocast_enabled(device.type),
            torch.get_autocast_dtype(device.type),
        )
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        with torch.no_grad():
            output = run(hidden, *rest)
        ctx.host = _to_host(hidden)
        return output

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        device = ctx.device
        hidden = ctx.host.to(device, non_blocking=True).requires_grad_(True)
        ctx.host = None
        enabled, dtype = ctx.autocast
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, device)
            with torch.autocast(device.type, dtype=dtype, enabled=enabled):
                output = ctx.run(hidden, *ctx.rest)
        outputs = output if isinstance(output, tuple) else (output,)
        pairs = [
            (out, grad)
            for out, grad in zip(outputs, grads, strict=False)
            if isinstance(out, Tensor) and out.requires_grad and grad is not None
        ]
        torch.autograd.backward([out for out, _ in pairs], [grad for _, grad in pairs])
        return (None, hidden.grad, *(None for _ in ctx.rest))


def offloaded_checkpoint(run: Callable, hidden: Tensor, *rest: Any, **unused: Any) -> Any:
    """Run `run(hidden, *rest)` checkpointed, with `hidden` held in CPU memory meanwhile.

    The signature of a transformers `_gradient_checkpointing_func`: the layer's call with
    its keyword arguments bound, then its positional ones, the hidden states first.

    Args:
        run: the layer's call.
        hidden: (B, T, d) the layer's input.
        *rest: further positional inputs (no gradient flows to them).
        **unused: the options transformers passes to torch's checkpoint (e.g.
            use_reentrant), which do not apply here.

    Returns:
        What `run` returns.
    """
    if not torch.is_grad_enabled():
        return run(hidden, *rest)
    if not hidden.requires_grad:
        # The function's output must require grad for the layer's LoRA weights to get one,
        # even where its input (frozen embeddings) does not.
        hidden = hidden.detach().requires_grad_(True)
    return _OffloadedCheckpoint.apply(run, hidden, *rest)


def enable_offloaded_checkpointing(model: nn.Module) -> int:
    """Make every checkpointed layer of `model` offload its input to CPU memory.

    Call it after gradient checkpointing is enabled (transformers then gives each layer a
    `_gradient_checkpointing_func`, which this replaces).

    Args:
        model: a transformers model, or a peft model around one.

    Returns:
        How many layers offload.
    """
    # The model classes carry the flag too; the layers are what calls the function.
    layers = [
        module
        for module in model.modules()
        if getattr(module, "gradient_checkpointing", False)
        and hasattr(module, "_gradient_checkpointing_func")
        and not isinstance(module, PreTrainedModel)
    ]
    for layer in layers:
        layer._gradient_checkpointing_func = offloaded_checkpoint
    return len(layers)
