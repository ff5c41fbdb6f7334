"""unsloth's FastLanguageModel (4-bit, its kernels) with TRL's SFTTrainer and a qseg loss
mixture. Needs a CUDA GPU and `pip install "qseg[unsloth]"`.

    python examples/unsloth_sft.py --model unsloth/Llama-3.2-1B-Instruct --max-steps 30
"""

import argparse
import json
from pathlib import Path

import datasets
import unsloth  # noqa: F401  (imported first: it patches transformers, peft and trl)
from trl import SFTConfig, SFTTrainer
from unsloth import FastLanguageModel

import qseg

SAMPLE = Path(qseg.__file__).parent / "data" / "samples" / "gsm8k" / "train.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a hub id or local folder")
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--output-dir", default="runs/unsloth-sft")
    args = parser.parse_args()

    model, tokenizer = FastLanguageModel.from_pretrained(args.model, load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(
        model,
        r=16,
        lora_alpha=16,
        target_modules=[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
        use_gradient_checkpointing="unsloth",
    )
    qseg.patch_model(model, {"cross_entropy": 0.6, "generalized_dice": 0.4})

    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    eos = tokenizer.eos_token
    data = [{"prompt": r["question"] + "\n", "completion": r["answer"] + eos} for r in rows]
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(
            output_dir=args.output_dir, max_steps=args.max_steps, logging_steps=1, report_to=[]
        ),
        train_dataset=datasets.Dataset.from_list(data),
        processing_class=tokenizer,
    )
    trainer.train()
    model.save_pretrained(args.output_dir)


if __name__ == "__main__":
    main()
