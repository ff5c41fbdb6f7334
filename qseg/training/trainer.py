"""The Trainer that computes a qseg loss mixture from hidden states, and its arguments.

`LossTrainer.compute_loss` never materialises (B, T, V) logits: it takes the last hidden
states from the decoder and hands them, with the lm head, to
`qseg.losses.fused_linear_loss`, which works through the vocabulary in chunks. The
batch counts (`TargetCounts`) make gradient accumulation and several processes update
as one large batch would.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from transformers import Trainer, TrainingArguments

from qseg.config import TrainConfig
from qseg.constants import IGNORE_INDEX
from qseg.losses import fused_linear_loss, plan_chunks
from qseg.models import backbone_hidden_states, logit_options, output_head

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TargetCounts:
    """What a batch scores, after the causal shift: the normalisers of the loss terms."""

    answer_tokens: int = 0  # positions with an answer label
    sequence_tokens: int = 0  # non-pad positions (cross-entropy with ce_scope="sequence")
    samples: int = 0  # samples with at least one answer label (region losses)

    @classmethod
    def of(cls, batch: dict[str, torch.Tensor]) -> TargetCounts:
        """The counts of a collated batch ("labels" and "attention_mask", each (B, T)) at
        positions 1..T-1, the ones a previous position predicts."""
        answer = batch["labels"][:, 1:] != IGNORE_INDEX
        return cls(
            answer_tokens=int(answer.sum()),
            sequence_tokens=int(batch["attention_mask"][:, 1:].sum()),
            samples=int(answer.any(dim=1).sum()),
        )

    def as_tuple(self) -> tuple[int, int, int]:
        return self.answer_tokens, self.sequence_tokens, self.samples

    def most(self, other: TargetCounts) -> TargetCounts:
        """The larger of each count."""
        return TargetCounts(*map(max, self.as_tuple(), other.as_tuple()))

    def __add__(self, other: TargetCounts) -> TargetCounts:
        return TargetCounts(
            self.answer_tokens + other.answer_tokens,
            self.sequence_tokens + other.sequence_tokens,
            self.samples + other.samples,
        )


def shift_left(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) labels of the next position: labels[:, 1:], then IGNORE_INDEX at the end."""
    return torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


class LossTrainer(Trainer):
    """A Trainer whose loss is a qseg loss mixture on the last hidden states and the head.

    Gradient accumulation: the Trainer hands every micro-batch the `TargetCounts` of the
    whole accumulated batch (as `num_items_in_batch`). Token-wise terms divide their sum
    by the accumulated token count and region terms weigh each micro-batch by its share
    of the accumulated samples, so the summed micro-batch losses (and their gradients)
    equal one large batch's: exactly for token-wise and per-sample region losses, and
    approximately for the batch-global Lovász (`per_sample=False`).

    Several processes (DDP, under torchrun or accelerate launch): the counts are summed
    over the processes and the loss multiplied by their number, since DDP averages the
    processes' gradients; N processes then update exactly as one with N times the batch.

    Args:
        *args, **kwargs: those of `transformers.Trainer`.
        losses: the loss mixture, {name: {"weight": w, **params}} as
            `qseg.losses.normalize_losses` returns it.
        ce_scope: what cross-entropy scores, "answer" or "sequence" (every non-pad token).
        chunk_size: rows per loss chunk, or "auto" for the auto-tuner's plan.
    """

    # The loss is already scaled for accumulation: the Trainer must not divide it again.
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        *args: Any,
        losses: dict[str, dict[str, Any]],
        ce_scope: str = "answer",
        chunk_size: int | str = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.losses = losses
        self.ce_scope = ce_scope
        self.chunk_size = chunk_size
        # transformers < 5.24 has no `loss_is_scaled_for_ga` and reads this flag instead.
        self.model_accepts_loss_kwargs = True
        self.largest_batch = TargetCounts()  # the most of each count in one micro-batch
        self.largest_positions = 0  # the most (B·T) positions in one micro-batch

    def get_batch_samples(
        self, epoch_iterator: Iterator, num_batches: int, device: torch.device
    ) -> tuple[list[dict[str, torch.Tensor]], TargetCounts]:
        """The next accumulated batch and its `TargetCounts` (instead of a token count)."""
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        per_batch = [TargetCounts.of(batch) for batch in batches]
        self.largest_batch = functools.reduce(TargetCounts.most, per_batch, self.largest_batch)
        positions = [batch["input_ids"].numel() for batch in batches]
        self.largest_positions = max([self.largest_positions, *positions])
        counts = sum(per_batch, TargetCounts())
        if self._normalizes_across_processes():
            per_process = self.accelerator.gather(torch.tensor(counts.as_tuple(), device=device))
            counts = TargetCounts(*per_process.view(-1, 3).sum(dim=0).tolist())
        return batches, counts

    def _normalizes_across_processes(self) -> bool:
        """Whether each process divides by the whole group's counts (the Trainer's default,
        `average_tokens_across_devices`) rather than by its own."""
        return self.args.average_tokens_across_devices and self.accelerator.num_processes > 1

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: TargetCounts | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict]:
        """The mixture on (hidden, labels shifted left): position t predicts token t+1.

        With ce_scope="sequence", cross-entropy scores every non-pad token (labels are the
        input ids) and the other terms the answer tokens: two passes over the head.
        The decoder runs under the accelerator's autocast, which the Trainer applies only
        to `model.forward` (bypassed here), so bf16 training keeps bf16 activations.

        Args:
            model: the model being trained, perhaps wrapped (DDP).
            inputs: the collated batch: "input_ids", "attention_mask", "labels", each (B, T).
            return_outputs: also return the (empty) outputs, as the Trainer may ask.
            num_items_in_batch: the accumulated batch's counts, from `get_batch_samples`;
                None outside the training loop (this batch's own counts are used).

        Returns:
            The scalar loss, or (loss, {}) with return_outputs.
        """
        totals = num_items_in_batch
        if not isinstance(totals, TargetCounts):  # called outside the training loop
            totals = TargetCounts.of(inputs)
        # DDP averages the processes' gradients: with counts that cover all processes
        # (from get_batch_samples), each process's loss is scaled up by their number.
        process_scale = 1
        if totals is num_items_in_batch and self._normalizes_across_processes():
            process_scale = self.accelerator.num_processes
        with self.accelerator.autocast():
            hidden = hidden_states(model, inputs["input_ids"], inputs["attention_mask"])
        head = output_head(self.accelerator.unwrap_model(model))
        # Shifting the labels, not the hidden states, keeps those contiguous: the loss then
        # reads them in place. The last position has no next token to score.
        answer_labels = shift_left(inputs["labels"])

        parts = []
        for scope, losses in self.loss_passes().items():
            if scope == "sequence":
                padding = inputs["attention_mask"] == 0
                labels = shift_left(inputs["input_ids"].masked_fill(padding, IGNORE_INDEX))
                part = self._fused(hidden, head, labels, losses, totals.sequence_tokens, None)
            else:
                part = self._fused(
                    hidden, head, answer_labels, losses, totals.answer_tokens, totals.samples
                )
            parts.append(part)
        loss = sum(parts[1:], parts[0]) * process_scale
        return (loss, {}) if return_outputs else loss

    def loss_passes(self) -> dict[str, dict[str, dict[str, Any]]]:
        """The mixture split by what it scores.

        Returns:
            {"sequence": cross-entropy} with ce_scope="sequence", and {"answer": the
            other losses} (every loss otherwise); a pass with no loss is left out.
        """
        answer_losses = dict(self.losses)
        passes = {}
        if self.ce_scope == "sequence" and "cross_entropy" in answer_losses:
            passes["sequence"] = {"cross_entropy": answer_losses.pop("cross_entropy")}
        if answer_losses:
            passes["answer"] = answer_losses
        return passes

    def chunk_plans(self, vocab: int, hidden_dim: int, dtype: torch.dtype) -> dict[str, dict]:
        """The auto-tuner's plan of each pass for the largest micro-batch trained on, the
        one that set the loss's peak memory (a smaller batch may get smaller chunks).

        Args:
            vocab, hidden_dim, dtype: the head's output size V, input size d and dtype.

        Returns:
            {pass: {"scored_tokens": n, **the plan}} for each pass that scored a token.
        """
        plans = {}
        for scope, losses in self.loss_passes().items():
            tokens = getattr(self.largest_batch, f"{scope}_tokens")
            if tokens == 0:
                continue
            device = self.accelerator.device
            plan = plan_chunks(
                tokens,
                vocab,
                hidden_dim,
                dtype,
                losses,
                device=device,
                positions=max(tokens, self.largest_positions),
            )
            plans[scope] = {"scored_tokens": tokens, **plan.as_dict()}
        return plans

    def _fused(
        self,
        hidden: torch.Tensor,
        head: torch.nn.Module,
        labels: torch.Tensor,
        losses: dict[str, dict[str, Any]],
        num_tokens: int,
        num_samples: int | None,
    ) -> torch.Tensor:
        return fused_linear_loss(
            hidden,
            head,
            labels,
            losses,
            chunk_size=self.chunk_size,
            num_tokens=num_tokens,
            num_samples=num_samples,
            **logit_options(self.model.config),  # Gemma 2's soft-cap, Granite's scale, ...
        )


def hidden_states(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """`backbone_hidden_states` of `model`, which the Trainer may have wrapped in
    DistributedDataParallel. DDP averages the gradients of what runs through its own
    forward only, so the call goes through the wrapper, with the wrapped model's forward
    returning the hidden states instead of logits for that one call.

    Args:
        model: the model, or its DDP wrapper.
        input_ids: (B, T) token ids.
        attention_mask: (B, T), 0 at padding.

    Returns:
        (B, T, d) the decoder's last hidden states.
    """
    if not isinstance(model, DistributedDataParallel):
        return backbone_hidden_states(model, input_ids, attention_mask)
    inner = model.module
    own_forward = inner.__dict__.get("forward")  # accelerate may have wrapped it (autocast)
    inner.forward = functools.partial(backbone_hidden_states, inner)
    try:
        return model(input_ids, attention_mask)
    finally:
        if own_forward is None:
            del inner.forward
        else:
            inner.forward = own_forward


def uses_cpu() -> bool:
    """True where training runs on the CPU: no CUDA or Apple GPU. Telling accelerate so
    lets `torchrun` start several CPU processes (gloo), as on GPUs."""
    return not torch.cuda.is_available() and not torch.backends.mps.is_available()


def uses_checkpointing(cfg: TrainConfig) -> bool:
    """cfg.gradient_checkpointing, with "auto" resolved: on wherever a GPU trains."""
    if cfg.gradient_checkpointing == "auto":
        return not uses_cpu()
    return cfg.gradient_checkpointing


def training_arguments(cfg: TrainConfig, output_dir: Path, dtype: torch.dtype) -> TrainingArguments:
    """The TrainingArguments of a run: one log entry (the step's loss) per optimizer step.

    Args:
        cfg: the run's config.
        output_dir: where the Trainer writes its checkpoints.
        dtype: the model's compute dtype, which picks bf16 or fp16 mixed precision on CUDA.

    Returns:
        The arguments, for one GPU per process (see `one_gpu_per_process`).
    """
    cuda = torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=cfg.max_steps if cfg.max_steps is not None else -1,
        num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        seed=cfg.seed,
        bf16=cuda and dtype == torch.bfloat16,
        fp16=cuda and dtype == torch.float16,
        logging_steps=1,
        # A NaN or inf loss is logged as it is (the default logs 0.0): run.json must not
        # report a diverged step as a perfect one.
        logging_nan_inf_filter=False,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,
        report_to="none",
        remove_unused_columns=False,  # the collator's batch is exactly what compute_loss reads
        label_names=["labels"],
        include_num_input_tokens_seen="non_padding",
        dataloader_pin_memory=cuda,
        use_cpu=uses_cpu(),
        # Every trainable weight (the LoRA adapters) gets a gradient at every step.
        ddp_find_unused_parameters=False,
    )
    return one_gpu_per_process(args)


def one_gpu_per_process(args: TrainingArguments) -> TrainingArguments:
    """A single process that sees several GPUs uses one. The Trainer would wrap the model
    in DataParallel, whose forward the loss from hidden states bypasses, and multiply the
    batch by the GPU count; several GPUs train through torchrun or accelerate launch.

    Args:
        args: the Trainer's arguments, changed in place and returned.
    """
    if args.n_gpu > 1:
        log.warning(
            "%d GPUs are visible but one process trains on one; to use them all, launch "
            "`torchrun --nproc-per-node %d -m qseg train ...`",
            args.n_gpu,
            args.n_gpu,
        )
        args._n_gpu = 1  # as the Trainer itself does for a model split across GPUs
    return args
