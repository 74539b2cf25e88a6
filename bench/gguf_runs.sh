#!/usr/bin/env bash
# The SmolLM2 runs the GGUF speed table and the alignment study measure, made in one go (SlimGPT, log schedule,
# C4 calibration, WikiText-2 perplexity on 32 windows of 128 tokens stored with each run):
#   20%, 35%, 50% without alignment and with --align $ALIGN (the default chosen from the study),
#   50% with --align 32, 64, 128, 256 (the study; 1 is the unaligned run).
# Existing run folders are kept (delete one to redo it). Then it prints the two benchmark commands.
#   bash bench/gguf_runs.sh [OUT_DIR]        (default: the workspace, $SLIMGPT_RUNS or runs/)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${SLIMGPT_RUNS:-runs}}"
ALIGN="${ALIGN:-64}"
CALIB="--calib c4 --nsamples ${NSAMPLES:-64} --seqlen ${SEQLEN:-512} --ppl wikitext2 --ppl-seqlen 128 --ppl-windows 32"
mkdir -p "$OUT"
prune() {  # ratio align
    local name="gguf-smollm2-r$1-a$2"
    if [ -f "$OUT/$name/report.json" ]; then echo "kept $OUT/$name"; return; fi
    echo "pruning $name ..." >&2
    local t0=$SECONDS
    python -m slimgpt_core prune --model default --ratio "$1" --schedule log --align "$2" $CALIB \
        --out "$OUT/$name" --quiet | tail -1
    echo "$name: $((SECONDS - t0)) s" >&2
}
for ratio in 0.2 0.35 0.5; do prune $ratio 1; prune $ratio "$ALIGN"; done
for align in 32 64 128 256; do prune 0.5 $align; done
runs() { local IFS=,; echo "$*"; }
echo
echo "speed table (dense, 20/35/50% unaligned and aligned to $ALIGN):"
echo "  python bench/gguf_speed.py --dense default --runs $(runs "$OUT"/gguf-smollm2-r{0.2,0.35,0.5}-a1 "$OUT"/gguf-smollm2-r{0.2,0.35,0.5}-a"$ALIGN") --json gguf_speed.json"
echo "alignment study (50%):"
echo "  python bench/gguf_speed.py --dense default --runs $(runs "$OUT"/gguf-smollm2-r0.5-a{1,32,64,128,256}) --prompts 128 --repeats 3 --ppl-windows 32 --json gguf_align.json"
