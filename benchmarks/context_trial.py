"""One trial of the longest-context search: build a QLoRA model under a memory cap and
train one optimizer step at a given length, in a fresh process.

A model of real architecture (Llama-3.1-8B or Qwen2.5-7B shapes, from the config dicts
below; nothing is downloaded) gets random weights. With the `transformers` backend its
decoder layers are quantized to 4-bit NF4 with bitsandbytes (double quantization, bf16
compute), embeddings, norms and head frozen in bf16, LoRA from peft on every attention
and MLP projection (rank `lora_r`, `qseg.models.LoraSettings`' other defaults) and
non-reentrant gradient checkpointing, as `qseg.models.load_model` sets it up; with
`offload_activations` each checkpointed layer's input waits in pinned CPU memory
(`qseg.models.offload`). On a CPU there is no other memory to offload to: as `qseg train`
does, the trial then trains without it, and its row says `offload_activations` False.
With the `unsloth` backend the model is loaded from its saved random-weight checkpoint
by unsloth (`benchmarks.context_models`), whose checkpointing always offloads.
The step runs under bf16 autocast as `qseg train` runs it. Batch 1, labels from a Zipf
law with 10% ignored. The process caps its CUDA memory with
`torch.cuda.set_per_process_memory_fraction(cap / card memory)`, builds the model under
that cap, and runs one AdamW step:
- `qseg`: decoder hidden states -> `qseg.losses.FusedLinearLoss` on the head (chunk "auto");
- `naive`: the model's full logits -> `qseg.losses.loss_from_logits`;
- `unsloth`: the model's own loss (`model(input_ids, labels=...).loss`), unsloth's fused
  cross-entropy, as its trainer computes it.
The cap counts PyTorch's allocations only; a real card of that size also holds the CUDA
context, so its limit sits slightly lower.

`benchmarks.max_context` starts each trial as its own worker process (`--case JSON`), so
a trial that runs out of memory or crashes leaves nothing behind for the next one.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from benchmarks import common
from benchmarks.context_models import MODELS, WEIGHTS, checkpoint_folder, load_unsloth_model
from qseg.loss_text import parse_losses

GiB = 1 << 30


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Make `dtype` torch's default dtype inside the block, and restore the previous one.

    Args:
        dtype: the dtype new floating-point tensors get.

    Returns:
        A context manager.
    """
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def quantize_linears(module: nn.Module, device: torch.device) -> None:
    """Replace every nn.Linear inside `module` by a bitsandbytes NF4 Linear4bit (as QLoRA).

    Args:
        module: changed in place, its children recursively.
        device: where the 4-bit weights go (quantization happens on the move there).
    """
    import bitsandbytes as bnb

    for name, child in list(module.named_children()):
        if not isinstance(child, nn.Linear):
            quantize_linears(child, device)
            continue
        with torch.device("meta"):
            layer = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                compute_dtype=torch.bfloat16,
                compress_statistics=True,
                quant_type="nf4",
            )
        layer.weight = bnb.nn.Params4bit(
            child.weight.data,
            requires_grad=False,
            compress_statistics=True,
            quant_type="nf4",
            module=layer,
        ).to(device)
        if child.bias is not None:
            layer.bias = nn.Parameter(child.bias.data, requires_grad=False)
        setattr(module, name, layer)


def build_model(
    name: str, layers: int | None, device: torch.device, lora_r: int, offload: bool
) -> tuple[nn.Module, int]:
    """The QLoRA model of `name` with random weights, built layer by layer on `device`.

    The skeleton is made on the meta device; each decoder layer is then created for real
    and quantized at once, so the build never holds more than one bf16 layer beyond the
    4-bit model (it runs under the trial's memory cap, like loading a quantized checkpoint).

    Args:
        name: a key of `MODELS`.
        layers: build only this many decoder layers; None builds them all.
        device: where the model is built and its decoder layers quantized.
        lora_r: the LoRA rank.
        offload: keep checkpointed layer inputs in CPU memory (on a GPU only).

    Returns:
        The peft model in train mode, LoRA weights trainable, everything else frozen, and
        how many layers offload their input.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from qseg.models import CHECKPOINTING_KWARGS, LoraSettings, decoder_of
    from qseg.models.offload import enable_offloaded_checkpointing

    spec = dict(MODELS[name])
    if layers is not None:
        spec["num_hidden_layers"] = layers
    config = AutoConfig.for_model(**spec)
    config.use_cache = False
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    decoder = decoder_of(model)
    with torch.device(device), default_dtype(torch.bfloat16):
        for index in range(len(decoder.layers)):
            layer = type(decoder.layers[index])(config, index)
            quantize_linears(layer, device)
            decoder.layers[index] = layer
        decoder.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        decoder.norm = type(decoder.norm)(config.hidden_size, eps=config.rms_norm_eps)
        decoder.rotary_emb = type(decoder.rotary_emb)(config=config)
        model.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
    left_on_meta = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left_on_meta:
        raise RuntimeError(f"parts of the model were never built: {left_on_meta[:5]}")
    model.requires_grad_(False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=CHECKPOINTING_KWARGS)
    # After checkpointing is enabled: offloading replaces the layers' checkpoint function.
    offloaded = enable_offloaded_checkpointing(model) if offload and device.type == "cuda" else 0
    lora = LoraSettings(r=lora_r)
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.targets),
        bias="none",
        task_type="CAUSAL_LM",
    )
    # Train mode: checkpointing and dropout on.
    return get_peft_model(model, config).train(), offloaded


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    case: dict[str, Any],
    labels: torch.Tensor,
    ids: torch.Tensor,
) -> None:
    """One forward, backward and optimizer step with the case's losses and impl.

    Args:
        model: from `build_model`.
        optimizer: over the model's trainable parameters.
        case: the trial's case; `loss` is the losses' text form, `impl` qseg, naive or
            unsloth.
        labels: (1, T) token ids, IGNORE_INDEX where ignored.
        ids: (1, T) input ids.
    """
    from qseg.losses import FusedLinearLoss, loss_from_logits
    from qseg.models import backbone_hidden_states, output_head

    losses = parse_losses(case["loss"])
    optimizer.zero_grad(set_to_none=True)
    # As `qseg train` runs on a GPU: the model under bf16 autocast, the loss outside it.
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=ids.is_cuda):
        if case["impl"] == "unsloth":
            # The model shifts labels left by one; shifted right here, every position
            # predicts the same token as on qseg's path.
            ignored = labels.new_full((1, 1), common.IGNORE_INDEX)
            shifted = torch.cat([ignored, labels[:, :-1]], dim=1)
            outputs = model(input_ids=ids, labels=shifted, use_cache=False).loss
        elif case["impl"] == "naive":
            outputs = model(input_ids=ids, use_cache=False).logits
        else:
            outputs = backbone_hidden_states(model, ids)
    if case["impl"] == "unsloth":
        loss = outputs
    elif case["impl"] == "naive":
        loss = loss_from_logits(outputs, labels, losses)
    else:
        loss = FusedLinearLoss(losses, chunk_size="auto")(outputs, output_head(model), labels)
    loss.backward()
    optimizer.step()


def trial_case(
    args: Any,
    device: torch.device,
    model: str,
    loss: str,
    setup: dict[str, Any],
    cap_gb: float | None,
    tokens: int,
) -> dict[str, Any]:
    """What one trial needs to run in a process of its own (JSON-serialisable).

    Args:
        args: the parsed `benchmarks.max_context` flags (layers, seed, threads).
        device: where the trial runs.
        model: a key of `MODELS`.
        loss: the losses' text form, e.g. `cross_entropy:0.6,lovasz:0.4`.
        setup: backend, impl, lora_r and offload_activations
            (`benchmarks.context_setups.SETUP_KEYS`).
        cap_gb: the memory cap; None for none (CPU).
        tokens: the sequence length to train at.

    Returns:
        The case, as `run_trial` reads it.
    """
    return dict(
        model=model,
        layers=args.layers,
        loss=loss,
        **setup,
        cap_gb=cap_gb,
        tokens=tokens,
        device=str(device),
        seed=args.seed,
        threads=args.threads,
        steps=args.steps,
        # Where unsloth loads the shape from (`context_models.save_checkpoint` writes it).
        checkpoint=str(checkpoint_folder(model, args.layers))
        if setup["backend"] == "unsloth"
        else None,
    )


def run_trial(case: dict[str, Any]) -> dict[str, Any]:
    """One trial in this (fresh) process: build under the cap, train one step, report.

    Args:
        case: from `trial_case`.

    Returns:
        The trial's row: `status` "ok" with `peak_mb` (added by the steps), `total_peak_mb`,
        `model_mb` and `ms` (the first step's), with more than one step `step_ms` (the
        median of the later ones) and `tokens_per_s`; or "oom" with `oom_stage` ("build"
        or "step"). `offload_activations` says whether layer inputs did wait in CPU memory.
    """
    device = torch.device(case["device"])
    spec = MODELS[case["model"]]
    row = dict(
        impl=case["impl"],
        loss=case["loss"],
        tokens=case["tokens"],
        backend=case["backend"],
        lora_r=case["lora_r"],
        offload_activations=case["offload_activations"],
        vocab=spec["vocab_size"],
        hidden=spec["hidden_size"],
        dtype=WEIGHTS,
        device=common.device_name(device),
        model=case["model"],
        layers=case["layers"] or spec["num_hidden_layers"],
        full_layers=spec["num_hidden_layers"],
        cap_gb=case["cap_gb"],
    )
    if device.type == "cuda" and case["cap_gb"] is not None:
        total = torch.cuda.get_device_properties(device).total_memory
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.set_per_process_memory_fraction(case["cap_gb"] * GiB / total, index)
    if device.type == "cpu":
        torch.set_num_threads(case["threads"])
    generator = torch.Generator().manual_seed(case["seed"])
    labels = common.zipf_labels(1, case["tokens"], spec["vocab_size"], generator=generator)
    ids = labels.clamp(min=0).roll(1, dims=1)  # inputs: the labels shifted right, as in text
    stage = "build"
    try:
        if case["backend"] == "unsloth":
            model = load_unsloth_model(case["checkpoint"], case["lora_r"], case["tokens"])
        else:
            model, offloaded = build_model(
                case["model"], case["layers"], device, case["lora_r"], case["offload_activations"]
            )
            row["offload_activations"] = offloaded > 0
            if case["offload_activations"] and not offloaded:
                row["note"] = "no GPU: nothing to offload to, trained without offloading"
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        labels, ids = labels.to(device), ids.to(device)
        stage = "step"
        row["model_mb"] = _allocated_mb(device)
        times = []

        def steps() -> None:
            for _ in range(case.get("steps", 1)):
                start = time.perf_counter()
                train_step(model, optimizer, case, labels, ids)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - start)

        row["peak_mb"] = common.peak_added_mb(steps, device)
        row["ms"] = times[0] * 1e3
        if len(times) > 1:  # the first step warms up (compilation, cuBLAS): left out
            row["step_ms"] = statistics.median(times[1:]) * 1e3
            row["tokens_per_s"] = case["tokens"] / statistics.median(times[1:])
        row["total_peak_mb"] = _total_peak_mb(device)
        row["status"] = "ok"
    except (RuntimeError, torch.OutOfMemoryError) as error:
        if not common.is_oom(error):
            raise
        row.update(status="oom", oom_stage=stage, peak_mb=None, ms=None)
    return row


def _allocated_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / common.MiB
    return common.proc_status_kb("VmRSS") / 1024


def _total_peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / common.MiB
    return common.proc_status_kb("VmHWM") / 1024
