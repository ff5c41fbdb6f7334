"""`qseg train`: fine-tuning a LoRA adapter with a qseg loss mixture.

`recipe.train` is the run, read top to bottom; `trainer` holds the Trainer that computes
the loss from hidden states, `callbacks` what it adds to the loop, `record` what the run
leaves to read (`run.json` and the summary printed at the end).
"""

from qseg.training.recipe import train
from qseg.training.record import summary
from qseg.training.trainer import (
    LossTrainer,
    TargetCounts,
    hidden_states,
    one_gpu_per_process,
)

__all__ = [
    "LossTrainer",
    "TargetCounts",
    "hidden_states",
    "one_gpu_per_process",
    "summary",
    "train",
]
