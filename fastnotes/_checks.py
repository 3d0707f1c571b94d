"""Argument checks shared by the ops: clear errors naming the argument, before any kernel runs."""
import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
REDUCTIONS = ("mean", "sum", "none")


def check_tensor(op, name, value, dtypes=None):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if dtypes is not None and value.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} must have dtype {names}; got {str(value.dtype).replace('torch.', '')}")


def check_same_device(op, anchor_name, anchor, **others):
    """Every tensor in `others` (None allowed) is on the device of `anchor`, the op's main input."""
    for name, value in others.items():
        if value is not None and value.device != anchor.device:
            raise ValueError(f"{op}: {name} is on {value.device} but {anchor_name} is on {anchor.device}")


def check_reduction(op, reduction):
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {REDUCTIONS}, got {reduction!r}")


def reduce(per_row, reduction, dtype):
    """Reduce per-row losses (any float dtype) over all rows; the result has `dtype`."""
    if reduction == "mean":
        return per_row.mean().to(dtype)
    if reduction == "sum":
        return per_row.sum().to(dtype)
    return per_row.to(dtype)
