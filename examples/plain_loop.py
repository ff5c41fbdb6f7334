"""A plain PyTorch loop with a qseg loss mixture (no trainer at all).

python examples/plain_loop.py --max-steps 10
"""

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import qseg
from qseg.models import convert_gguf, default_model_source

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", help="a local Hugging Face model folder (default: SmolLM2)")
parser.add_argument("--max-steps", type=int, default=10)
args = parser.parse_args()

model_dir = args.model or convert_gguf(Path(default_model_source()))[0]
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir)
qseg.patch_model(model, {"cross_entropy": 0.6, "lovasz": 0.4})
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

prompt, answer = "Question: 2 + 3 = ?\nAnswer: ", "5"
ids = tokenizer(prompt + answer + tokenizer.eos_token, return_tensors="pt")["input_ids"]
labels = ids.clone()
labels[:, : len(tokenizer(prompt)["input_ids"])] = -100  # score the answer only
for step in range(args.max_steps):
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    print(f"step {step}: loss {loss.item():.4f}")
