#!/usr/bin/env bash
# Idempotent set-up: the system BLAS (Linux), a virtual environment at .venv, and the
# project installed into it with its test extras. Sourced by serve.sh and test.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

openblas_present() {
    ldconfig -p 2>/dev/null | grep -q 'libopenblas\.so\.0' \
        || ls /usr/lib/*/openblas-pthread/libopenblas.so.0 >/dev/null 2>&1
}

if [ "$(uname -s)" = Linux ] && ! openblas_present; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "setup: installing Debian's libopenblas0-pthread (MLX's CPU wheel ships a slow reference BLAS)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q libopenblas0-pthread >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null && apt-get install -y -q libopenblas0-pthread >/dev/null; } \
            || echo "setup: could not install libopenblas0-pthread; continuing with the slow BLAS"
    else
        echo "setup: for ~30x faster float32 matmuls, run: sudo apt-get install libopenblas0-pthread"
    fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.blockserve-installed
want=$(cat pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e ".[test]"
    echo "$want" > "$stamp"
fi
