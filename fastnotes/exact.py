"""EXACT: train for accuracy directly (Karpukhin et al. 2022; Su, kexue.fm/archives/9098).
Math: docs/exact.md."""
import functools
import math

import numpy as np
import torch

from . import _checks, _dispatch, _registry
from ._autograd import once_differentiable
from .reference import exact as reference

_OP = "exact_loss"
AGGREGATIONS = ("mean", "meanlog")
MEANLOG_FLOOR = 1e-6


@functools.lru_cache(maxsize=None)
def gauss_hermite(nodes):
    """Probabilists' Gauss-Hermite nodes and weights normalised to sum to 1, as float64 tensors."""
    t, w = np.polynomial.hermite_e.hermegauss(nodes)
    w = w / math.sqrt(2 * math.pi)
    return torch.from_numpy(t), torch.from_numpy(w)


def _autocast_float32(fn):
    """Under autocast on the logits' device, run `fn` with autocast off and float16/bfloat16 tensor
    arguments widened to float32: a probability or a loss comes out in float32, as torch's losses
    do (float64 stays float64)."""

    def widen(value):
        if isinstance(value, torch.Tensor) and value.dtype in (torch.float16, torch.bfloat16):
            return value.float()
        return value

    @functools.wraps(fn)
    def wrapper(logits, *args, **kwargs):
        device_type = logits.device.type if isinstance(logits, torch.Tensor) else "cpu"
        if not torch.is_autocast_enabled(device_type):
            return fn(logits, *args, **kwargs)
        with torch.autocast(device_type, enabled=False):
            return fn(widen(logits), *map(widen, args), **{k: widen(v) for k, v in kwargs.items()})

    return wrapper


class _ExpectedAccuracyFunction(torch.autograd.Function):
    """P(correct) per row [B] through a fused kernel module; gradients for logits and sigma_rows."""

    @staticmethod
    def forward(ctx, logits, labels, sigma_rows, margin, nodes, log_weights, kernels):
        prob, log_terms = kernels.exact_forward(logits, labels, sigma_rows, margin, nodes, log_weights)
        ctx.save_for_backward(logits, labels, sigma_rows, log_terms)
        ctx.margin, ctx.nodes, ctx.log_weights, ctx.kernels = margin, nodes, log_weights, kernels
        return prob

    @staticmethod
    @once_differentiable(_OP)
    def backward(ctx, grad_prob):
        logits, labels, sigma_rows, log_terms = ctx.saved_tensors
        grad_logits, grad_sigma = ctx.kernels.exact_backward(
            logits, labels, sigma_rows, ctx.margin, ctx.nodes, ctx.log_weights, log_terms, grad_prob)
        return (grad_logits if ctx.needs_input_grad[0] else None, None,
                grad_sigma.to(sigma_rows.dtype) if ctx.needs_input_grad[2] else None, None, None, None, None)


def _check_arguments(logits, target, sigma, margin, nodes, reduction, aggregation):
    _checks.check_tensor(_OP, "logits", logits, _checks.FLOAT_DTYPES)
    _checks.check_tensor(_OP, "target", target, (torch.int64, torch.int32))
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"{_OP}: logits must be [batch, classes] with classes >= 1, "
                         f"got shape {tuple(logits.shape)}")
    if target.shape != logits.shape[:1]:
        raise ValueError(f"{_OP}: target must have shape [{logits.shape[0]}], got {tuple(target.shape)}")
    if isinstance(sigma, torch.Tensor):
        if not sigma.is_floating_point():
            raise TypeError(f"{_OP}: sigma must be a float or a floating tensor, got {sigma.dtype}")
        if sigma.shape not in ((), (1,), logits.shape[:1]):
            raise ValueError(f"{_OP}: sigma must be a scalar or have shape [{logits.shape[0]}], got {tuple(sigma.shape)}")
    elif not (isinstance(sigma, (int, float)) and not isinstance(sigma, bool) and 0 <= sigma < math.inf):
        raise ValueError(f"{_OP}: sigma must be a finite number >= 0 or a tensor, got {sigma!r}")
    if margin is not None and (isinstance(margin, bool) or not (isinstance(margin, (int, float)) and margin > 0)):
        raise ValueError(f"{_OP}: margin must be None or a positive number, got {margin!r}")
    if not (isinstance(nodes, int) and 2 <= nodes <= 128):
        raise ValueError(f"{_OP}: nodes must be an int in [2, 128], got {nodes!r}")
    _checks.check_reduction(_OP, reduction)
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"{_OP}: aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    _checks.check_same_device(_OP, "logits", logits, target=target,
                              sigma=sigma if isinstance(sigma, torch.Tensor) else None)


def _check_values(target, sigma, n_classes, ignore_index):
    """The checks that read tensor values, for CPU tensors (elsewhere they would cost a host-device
    sync; the rows they would refuse come out NaN)."""
    if isinstance(sigma, torch.Tensor) and not bool(((sigma >= 0) & (sigma < math.inf)).all()):
        raise ValueError(f"{_OP}: sigma must be finite and >= 0")
    if bool((((target < 0) | (target >= n_classes)) & (target != ignore_index)).any()):
        raise ValueError(f"{_OP}: target values must lie in [0, {n_classes}) or equal ignore_index")


@_dispatch.eager_op
@_autocast_float32
def expected_accuracy(logits, target, *, sigma=1.0, margin=None, nodes=32, ignore_index=-100):
    """P(argmax(logits + sigma * eps) == target), eps ~ N(0, I), per row [B], by a K-node
    Gauss-Hermite rule (deterministic; error ~2e-10 at K = 32). Rows whose target is ignore_index
    give 1. Differentiable in logits and, when it is a tensor, sigma.

    sigma = 0, or so small that 1/sigma overflows the compute dtype (float64 for float64 logits, else
    float32), is the limit sigma -> 0: the hard argmax with ties split evenly (P = 1/k when the target
    is one of k tied maxima, else 0), with zero gradients. r = (s_y - s_i)/sigma saturates at
    +-1e4, where every term is exactly 0 or 1. A -inf logit drops its class (with a margin M, it is a
    competitor beaten by M); ties of infinite logits count as ties, and infinite logits get no
    gradient. A NaN logit makes its row NaN."""
    _check_arguments(logits, target, sigma, margin, nodes, "none", "mean")
    n_classes = logits.shape[1]
    if logits.device.type == "cpu":
        _check_values(target, sigma, n_classes, ignore_index)
    ignored = target == ignore_index
    compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    # a Python float goes straight to the compute dtype (through float32 it would be off by 1e-8)
    sigma_rows = sigma if isinstance(sigma, torch.Tensor) else torch.tensor(sigma, dtype=compute_dtype,
                                                                            device=logits.device)
    sigma_rows = sigma_rows.reshape(-1).expand(logits.shape[0]).to(compute_dtype)
    # unchecked rows (off the CPU) with a bad target or sigma: the kernel sees harmless values, the
    # row comes out NaN (and an out-of-range label is never used as an index)
    invalid = (~ignored & ((target < 0) | (target >= n_classes))) | ~(sigma_rows.detach() >= 0)
    labels = torch.where(ignored, -1, torch.where(invalid, 0, target)).to(torch.int64).contiguous()
    sigma_rows = torch.where(invalid, 1.0, sigma_rows)
    node_values, weights = gauss_hermite(nodes)
    backend = _dispatch.select(_OP, logits.device.type,
                               lambda b: _dispatch.kernel_reason(_registry.EXACT, b, logits, "logits", nodes=nodes))
    if backend == "reference":
        prob = reference.expected_accuracy(logits, labels, sigma_rows, margin, node_values, weights)
    else:
        kernels = _registry.EXACT.kernels(backend)
        prob = _ExpectedAccuracyFunction.apply(
            logits.contiguous(), labels, sigma_rows, math.inf if margin is None else float(margin),
            node_values, torch.log(weights), kernels)
    return torch.where(invalid, math.nan, prob)


@_autocast_float32
def exact_loss(logits, target, *, sigma=1.0, margin=None, nodes=32, reduction="mean", aggregation="mean",
               ignore_index=-100):
    """EXACT loss: 1 - P(correct) per row (aggregation='mean', the paper's "expected error rate"),
    or -log(max(P, 1e-6)) (aggregation='meanlog', the fork's variant), where P is
    expected_accuracy(...): the probability that the target wins the argmax of logits + sigma * N(0, I).

    Args:
        logits: [B, C] float32/float16/bfloat16 (float64 on CPU).
        target: [B] int64 class indices; rows equal to ignore_index take no part.
        sigma: noise scale (temperature): float >= 0, or tensor [] / [B] that gets a gradient;
            0 gives the hard accuracy (see expected_accuracy).
        margin: optional M: competitors beaten by more than M stop pushing (r = min(s_y - s_i, M)/sigma).
        nodes: Gauss-Hermite nodes (32: error ~2e-10).
        reduction: 'mean' over non-ignored rows | 'sum' | 'none' ([B], 0 at ignored rows).
    Batch standardisation of the logits, the sigma schedule and gradient normalisation live in
    fastnotes.ExactLoss and fastnotes.GradientNormalizer, outside the kernel. Under autocast the
    loss is computed and returned in float32.
    """
    _check_arguments(logits, target, sigma, margin, nodes, reduction, aggregation)
    prob = expected_accuracy(logits, target, sigma=sigma, margin=margin, nodes=nodes, ignore_index=ignore_index)
    per_row = 1 - prob if aggregation == "mean" else -torch.log(prob.clamp_min(MEANLOG_FLOOR))
    kept = target != ignore_index
    per_row = torch.where(kept, per_row, torch.zeros_like(per_row))
    if reduction == "mean":
        return (per_row.sum() / kept.sum().clamp_min(1)).to(logits.dtype)
    return _checks.reduce(per_row, reduction, logits.dtype)


def smooth_accuracy_loss(logits, target, *, tau=1.0, reduction="mean"):
    """Su's smooth-accuracy loss 1 - softmax(logits / tau)_target (kexue.fm/archives/9098): its
    gradient is p_y times the cross-entropy gradient. Plain torch; for comparison with exact_loss."""
    _checks.check_tensor("smooth_accuracy_loss", "logits", logits, _checks.FLOAT_DTYPES)
    _checks.check_reduction("smooth_accuracy_loss", reduction)
    return _checks.reduce(reference.smooth_accuracy_loss(logits, target, tau), reduction, logits.dtype)


class ExactLoss(torch.nn.Module):
    """EXACT with what stays outside the kernel (docs/exact.md, 'Conventions'):
    - standardize: logits <- (logits - mean) / std over the whole batch tensor (gradients flow;
      a single logit, whose std is undefined, is only centred, i.e. 0);
    - a sigma schedule: sigma = max(sigma_min, sigma0 * decay ** step), advanced by .step_schedule();
    - margin, nodes, aggregation, reduction as in exact_loss.
    Pair it with GradientNormalizer after backward() when sigma gets small."""

    def __init__(self, sigma=1.0, *, decay=1.0, sigma_min=1e-3, margin=None, standardize=True, nodes=32,
                 aggregation="mean", reduction="mean", ignore_index=-100):
        super().__init__()
        if not (0 < decay <= 1):
            raise ValueError(f"ExactLoss: decay must lie in (0, 1], got {decay!r}")
        self.sigma0, self.decay, self.sigma_min = float(sigma), float(decay), float(sigma_min)
        self.margin, self.standardize, self.nodes = margin, standardize, nodes
        self.aggregation, self.reduction, self.ignore_index = aggregation, reduction, ignore_index
        self.steps = 0

    @property
    def sigma(self):
        return max(self.sigma_min, self.sigma0 * self.decay ** self.steps)

    def step_schedule(self):
        self.steps += 1

    def forward(self, logits, target):
        if self.standardize:
            centred = logits - logits.mean()
            logits = centred / logits.std().clamp_min(1e-12) if logits.numel() > 1 else centred
        return exact_loss(logits, target, sigma=self.sigma, margin=self.margin, nodes=self.nodes,
                          reduction=self.reduction, aggregation=self.aggregation, ignore_index=self.ignore_index)


class GradientNormalizer:
    """Divide every parameter gradient by max(EMA of the global gradient norm, clip), after
    backward(): EXACT's gradient scale swings with sigma. The first call uses the raw norm."""

    def __init__(self, parameters, *, clip=1e-2, momentum=0.9):
        self.parameters = [p for p in parameters]
        self.clip, self.momentum, self.average = clip, momentum, None

    @torch.no_grad()
    def __call__(self):
        grads = [p.grad for p in self.parameters if p.grad is not None]
        if not grads:
            return
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        self.average = norm if self.average is None else self.momentum * self.average + (1 - self.momentum) * norm
        scale = 1.0 / self.average.clamp_min(self.clip)
        for g in grads:
            g.mul_(scale)
