#!/usr/bin/env bash
# Everything owed on a GPU, in a few calls of the device tool (each call runs at most 10 minutes):
#
#     bash bench/gpu_session.sh tests     build fastnotes._C with nvcc, then the whole test suite on CUDA
#                                          (conftest picks the device: the gpu-marked tests run too)
#     bash bench/gpu_session.sh bench-a   GPU benchmarks: ZLPR (dense, sparse, fused linear), EXACT,
#                                          n x m, ladder_merge
#     bash bench/gpu_session.sh bench-b   GPU benchmarks: attention (incl. the bf16 L = 4096 target),
#                                          diffusion step, hubness (CUDA C++ top-k), Amos
#     bash bench/gpu_session.sh bench-c   GPU benchmarks: global_pointer (incl. the bf16 (16, 512, 10, 64)
#                                          target vs the dense composite)
#
# Logs, pytest-benchmark JSON and a Markdown report (bench/report.py) go to $OUT (the device tool's
# folder that comes back; ./gpu-out when unset). The image's python3 has torch, triton, numba, scipy,
# pytest and pytest-benchmark; nothing is downloaded (pip runs with --no-deps --no-build-isolation).
# A short summary is printed last, so that the tail of the output carries it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
stage=${1:-}

if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_session: no CUDA device visible to $PY; run this on a GPU machine" >&2
    exit 2
fi
{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
    $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$OUT/env-$stage.txt" 2>&1

install() {
    # builds csrc/ into fastnotes._C (FASTNOTES_CUDA=1: fail loudly if nvcc cannot build it)
    FASTNOTES_CUDA=1 $PY -m pip install --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 \
        || { tail -30 "$OUT/install.log"; exit 1; }
    $PY -c "import fastnotes._C" || exit 1
}

bench() {  # name, pytest args...
    local name=$1
    shift
    $PY -m pytest -q -p no:cacheprovider "$@" --benchmark-json="$OUT/$name.json" > "$OUT/$name.log" 2>&1
    echo "$name: $(tail -1 "$OUT/$name.log")"
    $PY bench/report.py "$OUT/$name.json" --out "$OUT/BENCHMARKS-gpu.md" \
        --command "bash bench/gpu_session.sh $stage (pytest $*)" >> "$OUT/report.log" 2>&1
}

case "$stage" in
    tests)
        install
        $PY -m pytest -q -p no:cacheprovider -ra tests > "$OUT/tests.log" 2>&1
        grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -40
        echo "tests: $(tail -1 "$OUT/tests.log")"
        ;;
    bench-a)
        install
        bench zlpr bench/bench_zlpr.py -k cuda
        bench zlpr_extreme bench/bench_zlpr_extreme.py -k cuda
        bench exact bench/bench_exact.py -k cuda
        bench nm_class bench/bench_nm_class.py -k cuda
        bench lst bench/bench_lst.py -k cuda
        ;;
    bench-b)
        install
        bench attention bench/bench_attention.py -k "cuda or gpu_target"
        bench diffusion bench/bench_diffusion.py -k cuda
        bench hubness_gpu bench/bench_hubness_gpu.py
        bench amos bench/bench_amos.py -k cuda
        ;;
    bench-c)
        install
        bench global_pointer bench/bench_global_pointer.py -k "cuda or gpu_target"
        ;;
    *)
        echo "usage: bash bench/gpu_session.sh tests|bench-a|bench-b|bench-c" >&2
        exit 2
        ;;
esac
echo "outputs in $OUT: $(ls "$OUT" | tr '\n' ' ')"
