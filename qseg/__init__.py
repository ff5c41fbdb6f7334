"""qseg: segmentation losses for quantized LoRA fine-tuning of language models.

    import qseg
    model = qseg.patch_model(model, {"cross_entropy": 0.6, "lovasz": 0.4})

`qseg.losses` holds the losses, `qseg.models` loads models, `qseg.training` is
`qseg train`'s recipe.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["patch_model", "unpatch_model"]


def __getattr__(name: str) -> Any:
    # Lazy: `import qseg` (and the `qseg` command's start) need not import torch.
    if name in __all__:
        from qseg import patch

        return getattr(patch, name)
    raise AttributeError(f"module 'qseg' has no attribute {name!r}")
