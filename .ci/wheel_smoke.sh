#!/usr/bin/env bash
# Wheel smoke test: `make wheel` (it carries fastnotes._C when nvcc is found), installed into a fresh
# virtualenv next to the pinned CPU build of torch, imported from outside the source tree and run;
# then the wheel built with FASTNOTES_CUDA=0 (pure Python) in the same venv, which must work too.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_PIN=${TORCH_PIN:-torch==2.13.0}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
step() { echo "wheel smoke [${SECONDS}s]: $*"; }

step "make wheel"
rm -rf dist
make wheel
cuda_wheel=$(ls dist/fastnotes-*.whl)
step "pure wheel (FASTNOTES_CUDA=0)"
FASTNOTES_CUDA=0 .venv/bin/python -m build --wheel --outdir "$work/pure" . >/dev/null
pure_wheel=$(ls "$work"/pure/fastnotes-*.whl)

step "fresh venv + $TORCH_PIN"
"$PYTHON" -m venv "$work/venv"
# the pin keeps pip from pulling CUDA torch wheels; --no-compile skips byte-compiling torch (~1.5 min)
"$work/venv/bin/pip" install --quiet --no-compile "$TORCH_PIN"

check() {  # $1: wheel, $2: 1 if it must carry fastnotes._C
    "$work/venv/bin/pip" install --quiet --no-compile --force-reinstall --no-deps "$1"
    "$work/venv/bin/pip" install --quiet --no-compile "$1"   # its dependencies (numpy, numba), once
    (cd "$work" && "$work/venv/bin/python" - "$2" <<'PY'
import importlib.util, os, sys
import torch
import fastnotes
from fastnotes import _dispatch

assert os.path.realpath(fastnotes.__file__).startswith(os.path.realpath(sys.prefix)), fastnotes.__file__
has_c = importlib.util.find_spec("fastnotes._C") is not None
assert has_c == (sys.argv[1] == "1"), f"fastnotes._C present: {has_c}, expected {sys.argv[1]}"
if has_c:
    import fastnotes._C as C
    print("fastnotes._C: CUDA runtime", C.cuda_runtime_version(), "max k", C.TOPK_MAX_K)
from fastnotes.kernels.cuda import hubness  # imports with or without the extension
loss = fastnotes.multilabel_ce(torch.randn(4, 50), torch.rand(4, 50) < 0.2)  # numba kernel from the wheel
assert torch.isfinite(loss), loss
print("wheel ok:", os.path.basename(os.path.dirname(fastnotes.__file__)), fastnotes.__version__,
      "loss", round(loss.item(), 4), "cuda backend:", _dispatch.availability("cuda", "cuda") or "available")
PY
    )
}

nvcc_found=0
if [ "${FASTNOTES_CUDA:-auto}" != "0" ] && { command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ] || [ -n "${CUDA_HOME:-}" ]; }; then
    nvcc_found=1
fi
step "$(basename "$cuda_wheel") (fastnotes._C expected: $nvcc_found)"
check "$cuda_wheel" "$nvcc_found"
step "$(basename "$pure_wheel")"
check "$pure_wheel" 0
step "done"
