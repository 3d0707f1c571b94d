"""Ladder Side-Tuning (Sung, Cho, Bansal 2022; Su, kexue.fm/archives/9138). Math: docs/lst.md.

A frozen backbone runs without an autograd graph; a narrow side network (width D / r) reads its
hidden states through ladders, o = mu s + (1 - mu) (h W^T + b) with mu = sigmoid(alpha / T), and only
the side network trains. ladder_merge is that merge as one fused op with the closed-form backward.
"""
import math

import torch

from . import _checks, _dispatch, _registry, reference
from ._autograd import AUTOCAST_CASTS, autocast_dtype, autocast_off, once_differentiable

_OP = "ladder_merge"


class _LadderMergeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, h, weight, bias, alpha, temperature, kernels):
        out = kernels.ladder_merge_forward(s, h, weight, bias, alpha, temperature)
        # z = h W^T + b is not saved: the backward needs only h (for dW), s (for dalpha), W, b, alpha
        ctx.save_for_backward(s, h, weight, bias, alpha)
        ctx.temperature = temperature
        ctx.kernels = kernels
        return out

    @staticmethod
    @once_differentiable(_OP)  # a double backward raises (the kernels' backward has no graph)
    def backward(ctx, grad_out):
        s, h, weight, bias, alpha = ctx.saved_tensors
        with autocast_off(s.device):  # a backward called inside autocast: the launchers' GEMMs as in forward
            grad_s, grad_w, grad_b, grad_alpha = ctx.kernels.ladder_merge_backward(
                grad_out.contiguous(), s, h, weight, bias, alpha, ctx.temperature)
            grad_h = None
            if ctx.needs_input_grad[1]:  # a trainable input (not LST's frozen backbone): dh = c g W
                c = 1.0 if alpha is None else 1 - torch.sigmoid(alpha / ctx.temperature)
                grad_h = (grad_out @ weight) * c
        return grad_s, grad_h, grad_w, grad_b, grad_alpha, None, None


def _check_arguments(s, h, weight, bias, alpha, temperature):
    for name, value in (("s", s), ("h", h), ("weight", weight)):
        _checks.check_tensor(_OP, name, value, _checks.FLOAT_DTYPES)
    if bias is not None:
        _checks.check_tensor(_OP, "bias", bias, _checks.FLOAT_DTYPES)
    if alpha is not None:
        _checks.check_tensor(_OP, "alpha", alpha, _checks.FLOAT_DTYPES)
        if alpha.numel() != 1:
            raise ValueError(f"{_OP}: alpha must hold one value, got shape {tuple(alpha.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"{_OP}: weight must be [d, D], got shape {tuple(weight.shape)}")
    d, D = weight.shape
    if s.dim() < 1 or s.shape[-1] != d:
        raise ValueError(f"{_OP}: s must be [..., {d}] (weight is [{d}, {D}]), got {tuple(s.shape)}")
    if h.shape[:-1] != s.shape[:-1] or h.shape[-1] != D:
        raise ValueError(f"{_OP}: h must be [{', '.join(map(str, s.shape[:-1] + (D,)))}] (s is {tuple(s.shape)}, "
                         f"weight is [{d}, {D}]), got {tuple(h.shape)}")
    if bias is not None and bias.shape != (d,):
        raise ValueError(f"{_OP}: bias must be [{d}], got {tuple(bias.shape)}")
    if s.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise TypeError(f"{_OP}: s, weight and bias must share a dtype; got {s.dtype}, {weight.dtype}, "
                        f"{None if bias is None else bias.dtype}")
    if not (isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
            and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{_OP}: temperature must be a finite number > 0, got {temperature!r}")
    _checks.check_same_device(_OP, "s", s, h=h, weight=weight, bias=bias, alpha=alpha)


@_dispatch.eager_op
def ladder_merge(s, h, weight, bias=None, alpha=None, *, temperature=0.1):
    """The ladder merge of LST, fused: o = mu s + (1 - mu) (h W^T + b), mu = sigmoid(alpha / T).

    Args:
        s: side stream [..., d]. h: backbone hidden states [..., D] (a constant for LST: no gradient
            is computed for it unless it requires grad; another float dtype is cast to s's dtype).
        weight: ladder downsample [d, D]; bias: [d] or None.
        alpha: the gate logit (a 1-element tensor, fp32 recommended) or None for Su's ungated
            o = s + h W^T + b.
        temperature: T of the gate (0.1 in the paper's code: a sharp gate).
    Gradients for s, weight, bias and alpha come from the closed form of docs/lst.md; z is never
    stored and dalpha is reduced deterministically. Under autocast, s, h, weight and bias are first
    cast to autocast's dtype (as for nn.Linear; float64 stays, alpha keeps its dtype), so the output
    is in that dtype; the kernels accumulate in float32.
    """
    lower = autocast_dtype(s.device) if isinstance(s, torch.Tensor) else None
    if lower is not None:
        s, h, weight, bias = (x.to(lower) if isinstance(x, torch.Tensor) and x.dtype in AUTOCAST_CASTS else x
                              for x in (s, h, weight, bias))
        with autocast_off(s.device):
            return ladder_merge(s, h, weight, bias, alpha, temperature=temperature)
    _check_arguments(s, h, weight, bias, alpha, temperature)
    if h.dtype != s.dtype:
        h = h.to(s.dtype)  # the same cast serves forward and backward (dW uses the saved h)

    backend = _dispatch.select(_OP, s.device.type,
                               lambda b: _dispatch.kernel_reason(_registry.LST, b, s, "s"))
    alpha0 = None if alpha is None else alpha.reshape(())
    if backend == "reference":
        return reference.lst.ladder_merge(s, h, weight, bias, alpha0, temperature)
    kernels = _registry.LST.kernels(backend)
    d, D = weight.shape
    lead = s.shape[:-1]
    bias_arg = bias if bias is not None else torch.zeros(d, dtype=s.dtype, device=s.device)
    out = _LadderMergeFunction.apply(s.reshape(-1, d).contiguous(), h.reshape(-1, D).contiguous(), weight.contiguous(),
                                     bias_arg, alpha0, float(temperature), kernels)
    return out.reshape(*lead, d)


_MOVED_TO_NN = ("LadderMerge", "LadderSideNetwork", "fisher_importance")


def __getattr__(name):
    """The modules moved to fastnotes.nn; their old import path keeps working."""
    if name in _MOVED_TO_NN:
        from . import nn

        return getattr(nn, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
