"""unsloth before transformers: it patches transformers, peft and trl when imported, and
runs slower (and warns) when they were imported first."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys

log = logging.getLogger(__name__)

# The libraries unsloth patches at import.
PATCHED_BY_UNSLOTH = ("transformers", "peft", "trl")


def import_unsloth_first(backend: str) -> bool:
    """Import unsloth now when the run may use it: backend "auto" or "unsloth", a CUDA GPU
    visible and unsloth installed. Call it before anything imports transformers.

    A failed import is left for the backend choice to report (`qseg.models.load_model`
    falls back to transformers for "auto" and names the error for "unsloth").

    Args:
        backend: the run's backend setting.

    Returns:
        Whether unsloth is imported (now or before).
    """
    if "unsloth" in sys.modules:
        return True
    if backend not in ("auto", "unsloth") or importlib.util.find_spec("unsloth") is None:
        return False
    import torch  # unsloth does not patch torch

    if not torch.cuda.is_available():
        return False
    early = [name for name in PATCHED_BY_UNSLOTH if name in sys.modules]
    if early:
        log.warning("%s imported before unsloth: unsloth cannot patch them fully", early)
    try:
        importlib.import_module("unsloth")
    except Exception as err:  # noqa: BLE001 - unsloth fails in many ways off its platforms
        log.info("unsloth did not import (%s: %s)", type(err).__name__, err)
        return False
    return True
