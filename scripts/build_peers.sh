#!/usr/bin/env bash
# Build the peers xlaserve is benchmarked against, OUTSIDE the repository.
#
#   scripts/build_peers.sh server   # llama.cpp's llama-server from llama-cpp-python's PyPI sdist
#   scripts/build_peers.sh venv     # venv with llama-cpp-python[server] (its own OpenAI server)
#   scripts/build_peers.sh gguf     # F32/F16 GGUFs of SmolLM2-135M-Instruct (bench/make_gguf_f32.py)
#   scripts/build_peers.sh all      # the three, one after the other (never concurrently)
#
# Everything lands under $PEERS_DIR (default /work/peers); nothing is written inside the repo.
# The only source fetched is the llama-cpp-python sdist from PyPI (pip's ordinary client); the
# llama.cpp it builds is the copy vendored in that sdist, so the server and the Python binding share
# one llama.cpp version. CPU-only build (no CUDA), tuned for the build host (GGML_NATIVE=ON).
# Builds run under `nice` because the build host is shared; expect ~15 min per stage on 2 cores.
set -euo pipefail

PEERS_DIR=${PEERS_DIR:-/work/peers}
LCP_VERSION=${LCP_VERSION:-0.3.36}
JOBS=${JOBS:-2}
PY=${PY:-/work/main/.venv/bin/python}
REPO_ROOT=$(cd "$(dirname "$0")/.." && pwd)

SRC_DIR="$PEERS_DIR/src"
LCP_SRC="$SRC_DIR/llama_cpp_python-$LCP_VERSION"
LLAMA_SRC="$LCP_SRC/vendor/llama.cpp"
BUILD_DIR="$PEERS_DIR/build-llama-server"
VENV="$PEERS_DIR/venv-lcp"
MODELS="$PEERS_DIR/models"

fetch_sdist() {
    mkdir -p "$SRC_DIR"
    local tarball="$SRC_DIR/llama_cpp_python-$LCP_VERSION.tar.gz"
    if [[ ! -f "$tarball" ]]; then
        "$PY" -m pip download --no-deps --no-binary :all: "llama-cpp-python==$LCP_VERSION" \
            -d "$SRC_DIR"
    fi
    if [[ ! -d "$LCP_SRC" ]]; then
        tar -xzf "$tarball" -C "$SRC_DIR"
    fi
}

build_server() {
    fetch_sdist
    # LLAMA_USE_PREBUILT_UI=OFF: the default downloads the web UI at configure time (no network
    # besides package registries here, and the benchmark needs only the HTTP API).
    # LLAMA_OPENSSL=OFF: loopback HTTP only.
    cmake -S "$LLAMA_SRC" -B "$BUILD_DIR" -G Ninja \
        -DCMAKE_BUILD_TYPE=Release \
        -DGGML_NATIVE=ON -DGGML_CUDA=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF \
        -DLLAMA_OPENSSL=OFF \
        -DBUILD_SHARED_LIBS=OFF
    nice -n 15 cmake --build "$BUILD_DIR" -j"$JOBS" --target llama-server
    echo "llama-server: $BUILD_DIR/bin/llama-server"
    "$BUILD_DIR/bin/llama-server" --version || true
}

build_venv() {
    fetch_sdist
    if [[ ! -x "$VENV/bin/python" ]]; then
        "$PY" -m venv "$VENV"
    fi
    "$VENV/bin/python" -m pip install --upgrade pip
    # Build the binding from the same sdist (CPU only). CMAKE_ARGS mirrors the llama-server build;
    # CMAKE_BUILD_PARALLEL_LEVEL keeps the shared host usable.
    CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_CUDA=OFF -DLLAMA_OPENSSL=OFF" \
        CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" \
        nice -n 15 "$VENV/bin/python" -m pip install --no-cache-dir \
        "$LCP_SRC[server]"
    "$VENV/bin/python" -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__)"
}

build_gguf() {
    mkdir -p "$MODELS"
    PYTHONPATH="$REPO_ROOT" "$PY" "$REPO_ROOT/bench/make_gguf_f32.py" \
        --dtype f32 --out "$MODELS/smollm2-f32.gguf"
    PYTHONPATH="$REPO_ROOT" "$PY" "$REPO_ROOT/bench/make_gguf_f32.py" \
        --dtype f16 --out "$MODELS/smollm2-f16.gguf"
}

case "${1:-all}" in
    server) build_server ;;
    venv) build_venv ;;
    gguf) build_gguf ;;
    all) build_server; build_gguf; build_venv ;;
    *) echo "usage: $0 [server|venv|gguf|all]" >&2; exit 2 ;;
esac
