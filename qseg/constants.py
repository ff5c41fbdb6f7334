"""Facts that several qseg modules share, each defined once.

The run folder's file names live in `qseg.run_files`; the loss names and their
parameters in `qseg.losses`.
"""

# How the base model is loaded and where its weights come from.
BACKENDS = ("auto", "unsloth", "transformers")
QUANTIZATIONS = ("auto", "4bit", "none")

# The attention and MLP projections of Llama-type decoders: the paper trains LoRA on all.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Which side a batch's shorter rows are padded on.
PADDING_SIDES = ("right", "left")

# GSM8K and MathQA answers: the calculator steps and final answer, or the full rationale.
FORMATS = ("steps", "full")

# What cross-entropy scores: the answer tokens, or every non-pad token (the paper's code).
CE_SCOPES = ("answer", "sequence")

# A label the losses skip: the transformers convention.
IGNORE_INDEX = -100
