"""Tensor-side helpers shared by the Numba launchers."""
import torch

COMPUTE_DTYPES = (torch.float32, torch.float64)


def compute_view(x):
    """The kernels compute in float32 or float64: float16/bfloat16 tensors are widened to float32
    (a copy); others pass through unchanged."""
    return x if x.dtype in COMPUTE_DTYPES else x.float()
