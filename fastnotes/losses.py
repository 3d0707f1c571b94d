"""Losses: the multi-label softmax cross-entropy (ZLPR) and its family. Math: specs/zlpr.md."""
import importlib
import math

import torch

from . import _checks, _dispatch, reference

_OP = "multilabel_ce"
_KERNELS = {"numba": "fastnotes.kernels.numba.zlpr", "triton": "fastnotes.kernels.triton.zlpr"}


class _MultilabelCEFunction(torch.autograd.Function):
    """Per-row ZLPR loss [N] from 2-D logits/targets [N, C] through a fused kernel module."""

    @staticmethod
    def forward(ctx, logits, targets, mask, kernels):
        loss, lse, n_bad = kernels.zlpr_forward(logits, targets, mask)
        # On CUDA the kernel marks such rows NaN instead: raising would need a host sync.
        if logits.device.type == "cpu" and int(n_bad) > 0:
            raise ValueError(f"{_OP}: targets must lie in [0, 1]; {int(n_bad)} value(s) do not")
        ctx.save_for_backward(logits, targets, mask, lse)
        ctx.kernels = kernels
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits, targets, mask, lse = ctx.saved_tensors
        grad_logits, grad_targets = ctx.kernels.zlpr_backward(
            logits, targets, mask, lse, grad_loss, need_grad_targets=ctx.needs_input_grad[1])
        return (grad_logits if ctx.needs_input_grad[0] else None), grad_targets, None, None


def _check_arguments(logits, targets, mask, reduction):
    _checks.check_tensor(_OP, "logits", logits, _checks.FLOAT_DTYPES)
    _checks.check_tensor(_OP, "targets", targets)
    if targets.dtype.is_complex:
        raise TypeError(f"{_OP}: targets must be bool, integer or floating, got {targets.dtype}")
    if logits.dim() < 1:
        raise ValueError(f"{_OP}: logits must have at least one dimension (the classes)")
    if targets.shape != logits.shape:
        raise ValueError(f"{_OP}: targets must have the shape of logits {tuple(logits.shape)}, "
                         f"got {tuple(targets.shape)}")
    if mask is not None:
        _checks.check_tensor(_OP, "mask", mask, (torch.bool,))
        try:
            torch.broadcast_shapes(mask.shape, logits.shape)
        except RuntimeError:
            raise ValueError(f"{_OP}: mask of shape {tuple(mask.shape)} does not broadcast to logits "
                             f"{tuple(logits.shape)}") from None
        if torch.broadcast_shapes(mask.shape, logits.shape) != logits.shape:
            raise ValueError(f"{_OP}: mask of shape {tuple(mask.shape)} would enlarge logits {tuple(logits.shape)}")
    _checks.check_same_device(_OP, "logits", logits, targets=targets, mask=mask)
    _checks.check_reduction(_OP, reduction)


def _mask_rows(mask, shape):
    """The mask as [1, C] when every row shares it, else [N, C]."""
    n_classes = shape[-1]
    if all(d == 1 for d in mask.shape[:-1]) and mask.shape[-1] == n_classes:
        return mask.reshape(1, n_classes).contiguous()
    return mask.expand(shape).reshape(-1, n_classes).contiguous()


def multilabel_ce(logits, targets, *, mask=None, reduction="mean"):
    """Multi-label softmax cross-entropy (ZLPR, Su 2020/2022) over the last dimension.

    loss = log(1 + sum_i t_i e^{-s_i}) + log(1 + sum_i (1 - t_i) e^{s_i}) per row, where the sums run
    over classes with mask True and logit != -inf; hard labels (t in {0, 1}) give the classic
    log(1 + sum_neg e^{s}) + log(1 + sum_pos e^{-s}). Predict class i when s_i > 0; sigmoid(2 s) is
    the calibrated probability.

    Args:
        logits: [..., C] float32/float16/bfloat16 (float64 on CPU). Unbounded scores: no sigmoid.
        targets: same shape; bool or {0, 1} integers (hard) or floats in [0, 1] (soft). Floating
            targets that require grad get a gradient.
        mask: optional bool, broadcastable to logits; False removes a class from the row.
        reduction: 'mean' | 'sum' over the leading dimensions, or 'none' for a [...] tensor.

    Targets outside [0, 1] raise ValueError on CPU; on CUDA (no host sync) their rows give NaN.
    A fully masked row has loss 0 and gradient 0.
    """
    _check_arguments(logits, targets, mask, reduction)
    backend = _dispatch.select(_OP, logits.device.type, lambda b: _dispatch.float_kernel_reason(b, logits, "logits"))
    if backend == "reference":
        if targets.dtype != torch.bool and bool(((targets < 0) | (targets > 1) | targets.isnan()).any()):
            raise ValueError(f"{_OP}: targets must lie in [0, 1]")
        if targets.requires_grad and bool(((targets == 0) | (targets == 1)).any()):
            raise ValueError(f"{_OP}: the reference backend differentiates targets only inside (0, 1); "
                             "the numba and triton backends give the one-sided gradient at 0 and 1")
        return reference.multilabel_ce(logits, targets, mask, reduction)
    kernels = importlib.import_module(_KERNELS[backend])
    shape_2d = (math.prod(logits.shape[:-1]), logits.shape[-1])
    rows = _MultilabelCEFunction.apply(
        logits.reshape(shape_2d).contiguous(),
        targets.reshape(shape_2d).contiguous(),
        None if mask is None else _mask_rows(mask, logits.shape),
        kernels,
    )
    return _checks.reduce(rows.reshape(logits.shape[:-1]), reduction, logits.dtype)


class MultilabelCE(torch.nn.Module):
    """Module form of multilabel_ce: `MultilabelCE(reduction="mean")(logits, targets, mask=None)`."""

    def __init__(self, reduction="mean"):
        super().__init__()
        _checks.check_reduction("MultilabelCE", reduction)
        self.reduction = reduction

    def forward(self, logits, targets, mask=None):
        return multilabel_ce(logits, targets, mask=mask, reduction=self.reduction)

    def extra_repr(self):
        return f"reduction={self.reduction!r}"
