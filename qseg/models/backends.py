"""Load a causal language model ready for (Q)LoRA training.

One entry point, `load_model`, resolves three choices:

* the source (`qseg.models.sources`): a hub id, a local Hugging Face folder or a `.gguf`.
* the backend: unsloth's `FastLanguageModel` where unsloth imports and a CUDA GPU is
  present, otherwise transformers (with bitsandbytes NF4 for 4-bit).
* the quantization: 4-bit on CUDA by default; on CPU only when asked for (bitsandbytes
  4-bit runs there, slowly), else bf16 on CUDA / fp32 on CPU.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from peft import PeftModel
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from qseg.constants import BACKENDS, PADDING_SIDES, QUANTIZATIONS
from qseg.models.lora import (
    DEFAULT_LORA,
    LoraSettings,
    attach_transformers_lora,
    attach_unsloth_lora,
    lora_summary,
)
from qseg.models.offload import enable_offloaded_checkpointing
from qseg.models.sources import SOURCES_ACCEPTED, convert_gguf, resolve_source

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A model ready for training or evaluation, and how it was actually loaded."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    backend: str  # "unsloth" | "transformers"
    quantization: str  # "4bit" | "none"
    dtype: torch.dtype  # compute dtype
    source: str  # what the caller asked for
    gguf_cache: str | None = None  # the Hugging Face folder a .gguf source was converted into
    converted: bool = False  # True when this call did the GGUF conversion (False: cache reused)
    adapter: str | None = None  # the peft adapter folder that was loaded, if any
    offloaded_layers: int = 0  # layers whose checkpointed input waits in CPU memory


def load_model(
    source: str,
    *,
    quantization: str = "auto",
    backend: str = "auto",
    lora: LoraSettings | None = DEFAULT_LORA,
    gradient_checkpointing: bool = True,
    offload_activations: bool = False,
    adapter: str | None = None,
    trainable: bool = True,
    padding_side: str = "right",
) -> LoadedModel:
    """Load `source` with the chosen backend and quantization, then attach LoRA.

    With `trainable=True` the base weights are frozen and a fresh LoRA adapter (`lora`) is
    attached, or the peft adapter in `adapter` is loaded as trainable; with `lora=None` and
    no adapter the whole (unquantized) model trains. With `trainable=False` everything is
    frozen and the model is in eval mode; `adapter`, if given, is loaded for inference.
    `offload_activations` keeps checkpointed layer inputs in CPU memory on a GPU with the
    transformers backend (unsloth's checkpointing offloads them itself; a CPU has no
    other memory to offload to).
    """
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
    # Resolve the source before choosing the backend: importing unsloth takes seconds, and a
    # mistyped path should fail at once.
    kind, location = resolve_source(source)
    backend, quantization, unsloth = _choose_backend(backend, quantization)
    if trainable and quantization == "4bit" and lora is None and adapter is None:
        raise ValueError(
            "4-bit weights cannot be trained directly: give LoRA settings or an adapter, "
            "or use quantization='none' for full fine-tuning"
        )
    if adapter is not None:
        check_adapter(Path(adapter))

    gguf_cache, converted, offloaded = None, False, 0
    if kind == "gguf":
        folder, converted = convert_gguf(Path(location))
        location = gguf_cache = str(folder)

    if unsloth is not None:
        model, tokenizer, dtype = _load_unsloth(unsloth, location, quantization)
    else:
        model, dtype = _load_transformers(location, quantization)
        tokenizer = AutoTokenizer.from_pretrained(location)
    _prepare_tokenizer(tokenizer, model, padding_side)

    if trainable:
        if unsloth is not None:
            model = attach_unsloth_lora(unsloth, model, lora, adapter, gradient_checkpointing)
        else:
            model = attach_transformers_lora(model, lora, adapter, gradient_checkpointing)
            if offload_activations and gradient_checkpointing:
                offloaded = _offload(model)
        model.train()
    else:
        model.requires_grad_(False)
        if adapter is not None:
            model = PeftModel.from_pretrained(model, adapter, is_trainable=False)
        model.eval()

    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        backend=backend,
        quantization=quantization,
        dtype=dtype,
        source=source,
        gguf_cache=gguf_cache,
        converted=converted,
        adapter=adapter,
        offloaded_layers=offloaded,
    )


def _offload(model: nn.Module) -> int:
    if not torch.cuda.is_available():
        log.warning("--offload-activations: no GPU, so nothing to offload; training without it")
        return 0
    return enable_offloaded_checkpointing(model)


def check_adapter(folder: Path) -> None:
    """Refuse, before any loading, an adapter folder that is missing or incomplete.

    Raises:
        FileNotFoundError: no adapter_config.json (not a peft adapter folder).
        ValueError: no weights, or weights that cannot be read (a truncated file).
    """
    if not (folder / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"adapter {str(folder)!r} is not a peft adapter folder (no adapter_config.json "
            "in it): a qseg train output dir holds one once training has finished"
        )
    weights = [folder / name for name in ("adapter_model.safetensors", "adapter_model.bin")]
    present = [path for path in weights if path.is_file()]
    if not present:
        raise ValueError(
            f"adapter {folder} has no weights (adapter_model.safetensors): its run did not "
            "finish; resume it with qseg train --resume, or use one of its checkpoints"
        )
    if present[0].suffix == ".safetensors":
        from safetensors import safe_open

        try:
            # Opening reads the header, which also states how long the file must be.
            with safe_open(str(present[0]), framework="pt") as weights_file:
                weights_file.metadata()
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
            raise ValueError(
                f"{present[0]} cannot be read ({err}); it is truncated or corrupt: train "
                "again, or use the adapter of one of the run's checkpoints"
            ) from None


def describe(loaded: LoadedModel) -> dict[str, Any]:
    """A JSON-ready summary of how the model was loaded, for run.json."""
    trainable, total = count_parameters(loaded.model)
    return {
        "source": loaded.source,
        "gguf_cache": loaded.gguf_cache,
        "gguf_converted_now": loaded.converted,
        "adapter": loaded.adapter,
        "backend": loaded.backend,
        "quantization": loaded.quantization,
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "lora": lora_summary(loaded.model),
        "offloaded_layers": loaded.offloaded_layers,
        "trainable_params": trainable,
        "total_params": total,
    }


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as their unpacked size."""
    trainable = total = 0
    for param in model.parameters():
        # bitsandbytes packs two 4-bit values per byte; quant_state keeps the real shape.
        quant_state = getattr(param, "quant_state", None)
        n = math.prod(quant_state.shape) if quant_state is not None else param.numel()
        total += n
        trainable += n if param.requires_grad else 0
    return trainable, total


def _choose_backend(backend: str, quantization: str) -> tuple[str, str, ModuleType | None]:
    """Resolve "auto" choices; returns (backend, quantization, unsloth module or None)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    if quantization == "auto":
        quantization = "4bit" if torch.cuda.is_available() else "none"

    unsloth = None
    if backend in ("auto", "unsloth"):
        unsloth, reason = import_unsloth()
        if unsloth is None and backend == "unsloth":
            raise ValueError(
                f"backend 'unsloth' is not available: {reason}; "
                "use backend 'transformers' (or 'auto', which falls back to it)"
            )
        if unsloth is None:
            log.info("using the transformers backend: %s", reason)
    return ("unsloth" if unsloth else "transformers"), quantization, unsloth


def import_unsloth() -> tuple[ModuleType | None, str]:
    """Import unsloth only where it can work: it needs a CUDA GPU and fails without one."""
    if not torch.cuda.is_available():
        return None, "unsloth needs a CUDA GPU and none is visible"
    if importlib.util.find_spec("unsloth") is None:
        return None, "unsloth is not installed (pip install 'qseg[unsloth]')"
    try:
        return importlib.import_module("unsloth"), ""
    except Exception as err:  # unsloth raises many kinds of errors on unsupported setups
        return None, f"importing unsloth failed ({type(err).__name__}: {err})"


def _load_transformers(location: str, quantization: str) -> tuple[PreTrainedModel, torch.dtype]:
    """Load with transformers; 4-bit is bitsandbytes NF4 with double quantization."""
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    options: dict[str, Any] = {"dtype": dtype}
    if cuda:
        options["device_map"] = {"": torch.cuda.current_device()}
    if quantization == "4bit":
        options["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(location, **options)
    except OSError as err:
        raise ValueError(
            f"could not load model {location!r} ({err}); model must be {SOURCES_ACCEPTED}"
        ) from err
    except Exception as err:  # noqa: BLE001 - safetensors and torch raise their own kinds
        if (Path(location) / "qseg_gguf.json").is_file():  # a cached GGUF conversion
            raise ValueError(
                f"the cached conversion {location} cannot be read ({type(err).__name__}: "
                f"{str(err)[:120]}); delete that folder and run again to convert anew"
            ) from None
        raise
    return model, dtype


def _load_unsloth(
    unsloth: ModuleType, location: str, quantization: str
) -> tuple[nn.Module, PreTrainedTokenizerBase, torch.dtype]:
    # dtype=None lets unsloth pick bf16 where the GPU supports it, else fp16.
    model, tokenizer = unsloth.FastLanguageModel.from_pretrained(
        model_name=location, dtype=None, load_in_4bit=quantization == "4bit"
    )
    return model, tokenizer, model.dtype


def _prepare_tokenizer(
    tokenizer: PreTrainedTokenizerBase, model: nn.Module, padding_side: str
) -> None:
    """Make sure there is a pad token (EOS when the model has none) and set the padding side."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    # generate() warns and guesses when the model does not know the pad id.
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
