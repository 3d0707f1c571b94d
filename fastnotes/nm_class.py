"""Su's "n x m classification" loss (experimental). Math: docs/nm_class.md."""
import math

import torch

from . import _checks, _dispatch, _registry, reference
from ._autograd import loss_dtype, once_differentiable

_NM_OP = "nm_class_ce"


class _NMClassCEFunction(torch.autograd.Function):
    """Per-sample L1 [B] from logits [B, n, m] and targets (soft [B, n, m] or integer [B, n])."""

    @staticmethod
    def forward(ctx, logits, targets, kernels):
        loss, lse, log_a = kernels.nm_class_forward(logits, targets)
        ctx.save_for_backward(logits, targets, lse, log_a)
        ctx.kernels = kernels
        return loss

    @staticmethod
    @once_differentiable(_NM_OP)
    def backward(ctx, grad_loss):
        logits, targets, lse, log_a = ctx.saved_tensors
        return ctx.kernels.nm_class_backward(logits, targets, lse, log_a, grad_loss), None, None


@_dispatch.eager_op
def nm_class_ce(logits, targets, *, reduction="mean"):
    """EXPERIMENTAL: Su's "n x m classification" loss (kexue.fm/archives/9158, an attempt he titled
    unsuccessful), for samples that each hold n m-class problems (e.g. the tokens of a sequence).

    Per sample: L1 = sum_j log(1 + sum_i t_ij (1/p_ij - 1)), p = softmax of each task's m scores.
    The sum over the n tasks sits inside the log for each class j, so a class's share of the loss
    grows like the log of how many tasks have it (balancing frequent classes). With hard labels where
    each class is the target of at most one task it equals the summed cross-entropy exactly; with
    shared targets it is smaller. Predict with argmax over m, as for cross-entropy.

    A +inf logit raises ValueError on CPU; on CUDA (no host sync) its sample's loss or gradient is
    not finite. -inf logits are allowed (a class a task cannot take).

    Known limitation: for soft labels the minimiser is not t (no closed form; the loss is not
    calibrated, spec oracle N6). Use it for hard labels.

    Args:
        logits: [..., n, m] float32/float16/bfloat16 (float64 on CPU).
        targets: integer [..., n] class per task (negative = padding task), or soft [..., n, m] in
            [0, 1] with rows summing to 1 (0 for a padding task). No gradient for targets.
        reduction: 'mean' | 'sum' over the samples (the leading dimensions), or 'none'.
    """
    _checks.check_tensor(_NM_OP, "logits", logits, _checks.FLOAT_DTYPES)
    _checks.check_tensor(_NM_OP, "targets", targets)
    _checks.check_reduction(_NM_OP, reduction)
    if logits.dim() < 2:
        raise ValueError(f"{_NM_OP}: logits must be [..., n, m], got shape {tuple(logits.shape)}")
    n_classes = logits.shape[-1]
    soft = targets.dtype.is_floating_point
    if not soft and (targets.dtype.is_complex or targets.dtype == torch.bool):
        raise TypeError(f"{_NM_OP}: targets must be integer classes [..., n] or floating soft targets [..., n, m], "
                        f"got {targets.dtype}")
    expected = tuple(logits.shape) if soft else tuple(logits.shape[:-1])
    if tuple(targets.shape) != expected:
        raise ValueError(f"{_NM_OP}: {'soft' if soft else 'integer'} targets must have shape {expected}, "
                         f"got {tuple(targets.shape)}")
    _checks.check_same_device(_NM_OP, "logits", logits, targets=targets)
    if targets.requires_grad:
        raise ValueError(f"{_NM_OP}: no gradient for targets; pass targets.detach()")
    if logits.device.type == "cpu":  # on CUDA this would need a host sync
        if bool(torch.isposinf(logits).any()):
            raise ValueError(f"{_NM_OP}: logits must not be +inf (the loss has no finite gradient there)")
        if soft and bool(((targets < 0) | (targets > 1) | targets.isnan()).any()):
            raise ValueError(f"{_NM_OP}: soft targets must lie in [0, 1]")
        if not soft and bool((targets >= n_classes).any()):
            raise ValueError(f"{_NM_OP}: integer targets must be < m = {n_classes} (negative = padding task)")
    backend = _dispatch.select(_NM_OP, logits.device.type, 
                              lambda b: _dispatch.kernel_reason(_registry.NM_CLASS, b, logits, "logits",
                                                                n=logits.shape[-2], m=logits.shape[-1]))
    lead = logits.shape[:-2]
    if backend == "reference":
        return reference.nm_class_ce(logits.to(loss_dtype(logits)), targets, reduction)
    kernels = _registry.NM_CLASS.kernels(backend)
    block = (math.prod(lead),) + tuple(logits.shape[-2:])
    rows = _NMClassCEFunction.apply(logits.reshape(block).contiguous(),
                                    targets.reshape(block if soft else block[:2]).contiguous(), kernels)
    return _checks.reduce(rows.reshape(lead), reduction, loss_dtype(logits))
