"""Fine-tune with transformers' Trainer and a qseg loss mixture.

    python examples/hf_trainer.py --max-steps 20

The Trainer reads `outputs.loss`, which the patched model computes from its hidden states
and head; `num_items_in_batch` keeps gradient accumulation exact for token-wise terms.
"""

import argparse
import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

import qseg
from qseg.loss_text import parse_losses
from qseg.models import convert_gguf, default_model_source

SAMPLE = Path(qseg.__file__).parent / "data" / "samples" / "gsm8k" / "train.jsonl"


def encode(tokenizer, question: str, answer: str) -> dict[str, list[int]]:
    prompt = tokenizer(question + "\n")["input_ids"]
    completion = tokenizer(answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    return {"input_ids": prompt + completion, "labels": [-100] * len(prompt) + completion}


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(r["input_ids"]) for r in rows)
    batch = {"input_ids": [], "attention_mask": [], "labels": []}
    for r in rows:
        pad = width - len(r["input_ids"])
        batch["input_ids"].append(r["input_ids"] + [pad_id] * pad)
        batch["attention_mask"].append([1] * len(r["input_ids"]) + [0] * pad)
        batch["labels"].append(r["labels"] + [-100] * pad)
    return {key: torch.tensor(value) for key, value in batch.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a local Hugging Face model folder (default: SmolLM2)")
    parser.add_argument("--loss", default="cross_entropy:0.6,generalized_dice:0.4")
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--output-dir", default="runs/hf-trainer")
    args = parser.parse_args()

    model_dir = args.model or convert_gguf(Path(default_model_source()))[0]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    qseg.patch_model(model, parse_losses(args.loss))

    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    data = [encode(tokenizer, r["question"], r["answer"]) for r in rows]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    training = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=2e-4,
        logging_steps=1,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False,
    )
    trainer = Trainer(
        model=model,
        args=training,
        train_dataset=data,
        data_collator=lambda rows: collate(rows, pad_id),
    )
    trainer.train()
    model.save_pretrained(args.output_dir)


if __name__ == "__main__":
    main()
