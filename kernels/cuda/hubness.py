"""k-NN candidates and k-occurrence counting on CUDA: the Triton tile (kernels/triton/hubness.py)
writes int64 (value, index) keys, and the CUDA C++ merge from fastnotes._C (csrc/hubness_topk.cu)
keeps each row's running top-k; counting uses its integer-atomic kernel. The caller
(fastnotes/hubness/_exact.py) centres the rows, keeps k + a margin of candidates and makes the
selection exact. Math: docs/hubness.md.

The ops are torch.library custom ops in the name space "fastnotes" (torch.ops.fastnotes.hubness_candidates,
torch.ops.fastnotes.hubness_count) with fake implementations, so they trace under torch.compile. This
module imports without triton and without fastnotes._C (the fake implementations need neither);
running an op needs both. Arguments arrive checked (contiguous float32 centred rows and add on one
CUDA device, 1 <= k <= MAX_K).
"""
import importlib

import torch

MAX_K = 1024  # fastnotes._C.TOPK_MAX_K: each warp keeps its row's k keys in shared memory


def unsupported(candidates, dtype):
    """Why these kernels cannot keep `candidates` per row of `dtype` rows, or None."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return "cuda takes float32/float16/bfloat16 x (float64 runs on numba and reference)"
    if candidates > MAX_K:
        return f"cuda keeps at most {MAX_K} candidates per row, asked for {candidates}"
    return None


def _extension():
    try:
        return importlib.import_module("fastnotes._C")
    except ImportError as error:
        raise RuntimeError(
            "the cuda backend needs the extension fastnotes._C, which this install lacks: reinstall fastnotes "
            "with nvcc on PATH (or CUDA_HOME set; FASTNOTES_CUDA=1 makes a missing compiler an error), "
            "or use the triton backend") from error


def _check_k(k):
    if not 1 <= k <= MAX_K:
        raise ValueError(f"k must be in 1..{MAX_K} on the cuda backend, got {k}")


def _triton_tiles():
    from fastnotes.kernels.triton import hubness  # triton comes with CUDA builds of torch, not CPU ones

    return hubness


def _stream(t):
    ext = _extension()
    device = t.device.index if t.device.index is not None else torch.cuda.current_device()
    return ext, device, torch.cuda.current_stream(t.device).cuda_stream


def knn_keys(x, reference, add, scale, k, exclude_self, **tiles):
    """Each query's k smallest (value, index) keys [n, k], ascending, merged by fastnotes._C."""
    _check_k(k)
    ext, device, stream = _stream(x)

    def merge(tile, best):
        ext.topk_merge(device, stream, tile.data_ptr(), tile.shape[0], tile.shape[1], tile.stride(0),
                       best.data_ptr(), k)

    return _triton_tiles().knn_keys(x, reference, add, scale, k, exclude_self, merge=merge, **tiles)


@torch.library.custom_op("fastnotes::hubness_candidates", mutates_args=(), device_types="cuda")
def _candidates_op(x: torch.Tensor, reference: torch.Tensor, add: torch.Tensor, scale: float, k: int,
                   exclude_self: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _triton_tiles().decode_keys(knn_keys(x, reference, add, scale, k, exclude_self))


@_candidates_op.register_fake
def _(x, reference, add, scale, k, exclude_self):
    return x.new_empty(x.shape[0], k, dtype=torch.float32), x.new_empty(x.shape[0], k, dtype=torch.int64)


@torch.library.custom_op("fastnotes::hubness_count", mutates_args=(), device_types="cuda")
def _count_op(indices: torch.Tensor, m: int) -> torch.Tensor:
    ext, device, stream = _stream(indices)
    indices = indices.contiguous()  # an index < 2^32 is its own key for the count kernel
    counts = torch.zeros(m, dtype=torch.int64, device=indices.device)
    ext.count_neighbours(device, stream, indices.data_ptr(), indices.numel(), counts.data_ptr())
    return counts


@_count_op.register_fake
def _(indices, m):
    return indices.new_empty(m, dtype=torch.int64)


def candidates(x, reference, add, scale, k, exclude_self):
    """(v [n, k] float32, indices [n, k] int64): each query's k best references by (v, index),
    v = add_j + scale <x_i, reference_j>, as kernels/triton/hubness.candidates."""
    return torch.ops.fastnotes.hubness_candidates(x, reference, add, scale, k, exclude_self)


def count(indices, m):
    """counts [m] int64: how often each reference index occurs in indices (int64, values < m)."""
    return torch.ops.fastnotes.hubness_count(indices, m)
