#!/usr/bin/env bash
# llama-cpp-python, pinned: its bundled llama.cpp has the `deci` architecture with per-layer head and FFN
# arrays, which mixed-shape GGUF exports use. It builds llama.cpp from source (about ten minutes on two cores
# the first time; pip caches the wheel, so later runs take seconds). GGML_NATIVE builds for this machine's CPU:
# the wheel cache is per machine, and the speed figures are only meaningful with the CPU's own vector units.
# LLAMACPP_VERBOSE=1 shows the build's steps (the studio reads them as progress).
# The server, tools, tests, examples and the multimodal library are not built: only the library the bindings load.
set -euo pipefail
cd "$(dirname "$0")"
LLAMA_CPP_PYTHON_VERSION=0.3.36
if python -c "import importlib.metadata as m, sys; sys.exit(m.version('llama-cpp-python') != '$LLAMA_CPP_PYTHON_VERSION')" 2>/dev/null; then
    exit 0
fi
CMAKE_ARGS="${CMAKE_ARGS:-} -DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
 -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DGGML_BUILD_TESTS=OFF -DGGML_BUILD_EXAMPLES=OFF" \
CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
    python -m pip install $([ "${LLAMACPP_VERBOSE:-}" = 1 ] && echo -v || echo -q) "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
