"""Exact k-NN and k-occurrence on CUDA: the Triton distance tile (kernels/triton/hubness.py) writes
int64 (distance, index) keys, and the CUDA C++ merge from fastnotes._C (csrc/hubness_topk.cu) keeps
each row's running top-k; counting uses its integer-atomic kernel. Math: specs/hubness.md section 6.

The ops are torch.library custom ops in the name space "fastnotes" (torch.ops.fastnotes.hubness_knn,
torch.ops.fastnotes.hubness_k_occurrence) with fake implementations, so they trace under
torch.compile. This module imports without triton and without fastnotes._C (the fake implementations
need neither); running an op needs both. Arguments arrive checked (contiguous float32/float16/bfloat16,
same dtype and CUDA device, 1 <= k < candidates, k <= MAX_K).
"""
import importlib

import torch

MAX_K = 1024  # fastnotes._C.TOPK_MAX_K: each warp keeps its row's k keys in shared memory


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


def _knn_keys(x, reference, k, metric, exclude_self, **tiles):
    _check_k(k)
    ext = _extension()
    device = x.device.index if x.device.index is not None else torch.cuda.current_device()
    stream = torch.cuda.current_stream(x.device).cuda_stream

    def merge(tile, best):
        ext.topk_merge(device, stream, tile.data_ptr(), tile.shape[0], tile.shape[1], tile.stride(0),
                       best.data_ptr(), k)

    return _triton_tiles().knn_keys(x, reference, k, metric, exclude_self, merge=merge, **tiles), ext, device, stream


@torch.library.custom_op("fastnotes::hubness_knn", mutates_args=(), device_types="cuda")
def _knn_op(x: torch.Tensor, reference: torch.Tensor, k: int, metric: str,
            exclude_self: bool) -> tuple[torch.Tensor, torch.Tensor]:
    keys = _knn_keys(x, reference, k, metric, exclude_self)[0]
    return _triton_tiles().neighbours(x, reference, keys, metric)


@_knn_op.register_fake
def _(x, reference, k, metric, exclude_self):
    return x.new_empty(x.shape[0], k, dtype=torch.float32), x.new_empty(x.shape[0], k, dtype=torch.int64)


@torch.library.custom_op("fastnotes::hubness_k_occurrence", mutates_args=(), device_types="cuda")
def _k_occurrence_op(x: torch.Tensor, reference: torch.Tensor, k: int, metric: str,
                     exclude_self: bool) -> torch.Tensor:
    keys, ext, device, stream = _knn_keys(x, reference, k, metric, exclude_self)
    counts = torch.zeros(reference.shape[0], dtype=torch.int64, device=x.device)
    ext.count_neighbours(device, stream, keys.data_ptr(), keys.numel(), counts.data_ptr())
    return counts


@_k_occurrence_op.register_fake
def _(x, reference, k, metric, exclude_self):
    return x.new_empty(reference.shape[0], dtype=torch.int64)


def knn(x, reference, k, metric, exclude_self):
    """(distances [n, k] float32, indices [n, k] int64), each row ascending by (distance, index)."""
    return torch.ops.fastnotes.hubness_knn(x, reference, k, metric, exclude_self)


def k_occurrence(x, reference, k, metric, exclude_self):
    """counts [m] int64: how many queries have each reference point among their k nearest."""
    return torch.ops.fastnotes.hubness_k_occurrence(x, reference, k, metric, exclude_self)
