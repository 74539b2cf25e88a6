#!/usr/bin/env bash
# Set-up on a fresh machine: Python packages, plus Debian's Chromium for the browser test (Playwright drives
# /usr/bin/chromium; `playwright install` is not needed).
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install -q -r requirements.txt
# the project itself, editable, with the `slimgpt` command; --no-deps: requirements.txt above already pinned them
python -m pip install -q --no-deps -e .
if ! command -v chromium >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium >/dev/null
fi
