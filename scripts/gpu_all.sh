#!/usr/bin/env bash
# The GPU check and the longest-context search, in one call of at most TOTAL_SECONDS
# (default 570): scripts/gpu_check.sh (the GPU tests and the three benchmarks), then the
# longest-context search goes on from gpu_check's brackets for the time that is left.
# Carry .gpu-site.
# Results: ${OUT:-benchmarks/results/gpu}, as the two scripts write them.
#
#   usage (repository root, on the GPU machine): [TOTAL_SECONDS=570] bash scripts/gpu_all.sh
set -u
start=$SECONDS
bash scripts/gpu_check.sh
# gpu_max_context.sh ends within its search time plus 140 s.
left=$((${TOTAL_SECONDS:-570} - (SECONDS - start) - 140))
if [ "$left" -ge 30 ]; then
  SEARCH_SECONDS=$left bash scripts/gpu_max_context.sh
else
  echo "no time left to go on with the longest-context search (${left} s)"
fi
