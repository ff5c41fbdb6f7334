#!/usr/bin/env bash
# The longest context on 16 and 24 GB, Llama-3.1-8B shape, batch 1, in one call of at
# most 9 minutes (every step under `timeout`; a failed step does not stop the next):
#   1. checkpoint: the shape's random-weight checkpoint, saved once for unsloth (reused
#      when $QSEG_CACHE already holds it);
#   2. unsloth_r32: on the unsloth backend, LoRA r 32 as unsloth's published figures: its
#      own path (fused cross-entropy) vs qseg with cross_entropy, lovasz and
#      cross_entropy:0.6,generalized_dice:0.4;
#   3. unsloth_r8: qseg's cross-entropy on unsloth at LoRA r 8;
#   4. offload: the transformers backend with --offload-activations (qseg, cross-entropy,
#      r 8); its rows without offloading come from the committed max_context_gpu.json;
#   5. speed_off, speed_on: tokens/s of the transformers backend without and with
#      offloading, at 8192 tokens (both fit 16 GB), over the steps after the first.
# The searches get a short time budget each: they go on from their earlier rows (this
# call's $out, else the committed results, if searched on this card), so repeated calls
# converge. Carry .gpu-site (bitsandbytes, unsloth). Results in ${OUT:-benchmarks/results/gpu}:
#   gpu_context.log  max_context_unsloth_gpu.json  max_context_offload_gpu.json
#   context_speed_offload_off_gpu.json  context_speed_offload_on_gpu.json
#
#   usage (repository root, on the GPU machine): bash scripts/gpu_context.sh
set -u
export PYTHONPATH="$PWD/.gpu-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# The checkpoint (16 GB of bf16) lives outside the working tree, which comes back.
export QSEG_CACHE=${QSEG_CACHE:-/tmp/qseg-cache}
out=${OUT:-benchmarks/results/gpu}
committed=benchmarks/results/gpu
mkdir -p "$out"
source "$(dirname "$0")/steps.sh"

# resume_from FILE...: --resume flags for the first of the files that exists.
resume_from() {
  for earlier in "$@"; do
    if [ -f "$earlier" ]; then
      echo "--resume $earlier --resume-if-same-card"
      return
    fi
  done
}

main() {
  date -u +"%Y-%m-%d %H:%M UTC"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  step checkpoint 70 python3 -c "import torch, importlib.util
print('torch', torch.__version__, 'unsloth found:', importlib.util.find_spec('unsloth') is not None)
from benchmarks.context_models import save_checkpoint
print('checkpoint (folder, saved now):', save_checkpoint('llama3.1-8b', None, torch.device('cuda')))"
  local mixes="cross_entropy lovasz cross_entropy:0.6,generalized_dice:0.4"
  local unsloth_file=$out/max_context_unsloth_gpu.json
  # $(resume_from ...) is left unquoted: its flags are meant to split.
  step unsloth_r32 150 python3 -m benchmarks.max_context --device cuda --models llama3.1-8b \
    --caps 16 24 --backends unsloth --impls qseg unsloth --lora-r 32 --mixes $mixes \
    --jobs 5 --time-budget 55 --trial-timeout 90 \
    $(resume_from "$unsloth_file" "$committed/max_context_unsloth_gpu.json") \
    --out "$unsloth_file" --overwrite
  step unsloth_r8 85 python3 -m benchmarks.max_context --device cuda --models llama3.1-8b \
    --caps 16 24 --backends unsloth --impls qseg --lora-r 8 --mixes cross_entropy \
    --jobs 2 --time-budget 15 --trial-timeout 65 \
    $(resume_from "$unsloth_file" "$committed/max_context_unsloth_gpu.json") \
    --out "$unsloth_file" --overwrite
  local offload_file=$out/max_context_offload_gpu.json
  step offload 90 python3 -m benchmarks.max_context --device cuda --models llama3.1-8b \
    --caps 16 24 --backends transformers --impls qseg --lora-r 8 --mixes cross_entropy \
    --offload-activations --jobs 2 --time-budget 25 --trial-timeout 60 \
    $(resume_from "$offload_file" "$committed/max_context_offload_gpu.json" \
      "$committed/max_context_gpu.json") \
    --out "$offload_file" --overwrite
  step speed_off 55 python3 -m benchmarks.max_context --device cuda --models llama3.1-8b \
    --backends transformers --impls qseg --lora-r 8 --mixes cross_entropy --tokens 8192 \
    --steps 3 --trial-timeout 50 --out "$out/context_speed_offload_off_gpu.json" --overwrite
  step speed_on 55 python3 -m benchmarks.max_context --device cuda --models llama3.1-8b \
    --backends transformers --impls qseg --lora-r 8 --mixes cross_entropy --tokens 8192 \
    --steps 3 --trial-timeout 50 --offload-activations \
    --out "$out/context_speed_offload_on_gpu.json" --overwrite
  summarize 'converged|tokens_per_s'
}

main 2>&1 | tee "$out/gpu_context.log"
rm -rf "$steps"
