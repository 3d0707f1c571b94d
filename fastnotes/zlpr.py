"""The multi-label softmax cross-entropy (ZLPR): dense, sparse positives and fused with the linear head.
Math: docs/zlpr.md."""
import math

import torch

from . import _checks, _dispatch, _registry, reference
from ._autograd import AUTOCAST_CASTS, autocast_dtype, autocast_off, loss_dtype, once_differentiable
from .kernels import _buffers

_OP = "multilabel_ce"


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
    @once_differentiable(_OP)
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


@_dispatch.eager_op
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
    backend = _dispatch.select(_OP, logits.device.type, lambda b: _dispatch.kernel_reason(_registry.ZLPR, b, logits, "logits"))
    if backend == "reference":
        if targets.dtype != torch.bool and bool(((targets < 0) | (targets > 1) | targets.isnan()).any()):
            raise ValueError(f"{_OP}: targets must lie in [0, 1]")
        if targets.requires_grad and bool(((targets == 0) | (targets == 1)).any()):
            raise ValueError(f"{_OP}: the reference backend differentiates targets only inside (0, 1); "
                             "the numba and triton backends give the one-sided gradient at 0 and 1")
        return reference.multilabel_ce(logits.to(loss_dtype(logits)), targets, mask, reduction)
    kernels = _registry.ZLPR.kernels(backend)
    shape_2d = (math.prod(logits.shape[:-1]), logits.shape[-1])
    rows = _MultilabelCEFunction.apply(
        logits.reshape(shape_2d).contiguous(),
        targets.reshape(shape_2d).contiguous(),
        None if mask is None else _mask_rows(mask, logits.shape),
        kernels,
    )
    return _checks.reduce(rows.reshape(logits.shape[:-1]), reduction, loss_dtype(logits))


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


# ---- sparse positives ----------------------------------------------------------------------------

_SPARSE_OP = "sparse_multilabel_ce"
_FUSED_OP = "fused_linear_multilabel_ce"
# Rows of logits per chunk of the fused op: about this many bytes of float32 logits at a time. Fewer
# rows make the three GEMMs slower on CPU (each chunk rereads W and rewrites dW).
FUSED_CHUNK_BYTES = 128 << 20


def _check_positives(op, pos_index, n_classes, lead_shape, device):
    """pos_index [..., K] (integer, -1 = padding) as int64 [N, K], and a per-row bad flag [N] (an
    index outside [-1, C) or listed twice). On CPU a bad row raises; on CUDA (no host sync) the caller
    turns it into a NaN loss, and bad rows are cleared to padding so kernels never index outside C."""
    _checks.check_tensor(op, "pos_index", pos_index, (torch.int64, torch.int32, torch.int16, torch.uint8))
    if pos_index.dim() < 1 or tuple(pos_index.shape[:-1]) != tuple(lead_shape):
        raise ValueError(f"{op}: pos_index must have shape [{', '.join(map(str, lead_shape))}, K], "
                         f"got {tuple(pos_index.shape)}")
    if pos_index.device != device:
        raise ValueError(f"{op}: pos_index is on {pos_index.device} but the logits are on {device}")
    index = pos_index.reshape(math.prod(lead_shape), pos_index.shape[-1]).to(torch.int64).contiguous()
    out_of_range = (index < -1) | (index >= n_classes)
    ordered = index.sort(dim=-1).values
    repeated = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
    bad_rows = out_of_range.any(-1) | repeated.any(-1)
    if device.type == "cpu":
        if bool(out_of_range.any()):
            raise ValueError(f"{op}: pos_index entries must lie in [0, {n_classes}) or be -1 (padding); "
                             f"found {int(index[out_of_range][0])}")
        if bool(repeated.any()):
            row = int(repeated.any(-1).nonzero()[0])
            raise ValueError(f"{op}: pos_index lists a class twice in row {row}")
        return index, None
    return torch.where(bad_rows[:, None], -1, index), bad_rows


def _nan_rows(rows, bad_rows):
    return rows if bad_rows is None else torch.where(bad_rows, float("nan"), rows)


class _SparseMultilabelCEFunction(torch.autograd.Function):
    """Per-row ZLPR loss [N] from logits [N, C] and positive indices [N, K]."""

    @staticmethod
    def forward(ctx, logits, pos_index, kernels):
        loss, lse = kernels.sparse_forward(logits, pos_index)
        ctx.save_for_backward(logits, pos_index, lse)
        ctx.kernels = kernels
        return loss

    @staticmethod
    @once_differentiable(_SPARSE_OP)
    def backward(ctx, grad_loss):
        logits, pos_index, lse = ctx.saved_tensors
        return ctx.kernels.sparse_backward(logits, pos_index, lse, grad_loss), None, None


@_dispatch.eager_op
def sparse_multilabel_ce(logits, pos_index, *, reduction="mean"):
    """ZLPR with the positives given as indices, for many classes and few positives per row.

    loss = log(1 + sum_{i not in P} e^{s_i}) + log(1 + sum_{j in P} e^{-s_j}) per row, the same value
    and gradient as multilabel_ce with the scattered {0, 1} targets. The negative sum is taken
    directly over the non-positives (bert4keras's "all minus positives" form cancels catastrophically
    when a positive dominates). A logit of -inf removes its class, positives included.

    Args:
        logits: [..., C] float32/float16/bfloat16 (float64 on CPU).
        pos_index: [..., K] integer class indices, padded with -1 (K << C; K = 0 is allowed).
        reduction: 'mean' | 'sum' over the leading dimensions, or 'none' for a [...] tensor.

    An index outside [0, C) other than -1, or a class listed twice in a row, raises ValueError on
    CPU; on CUDA (no host sync) that row's loss is NaN.
    """
    _checks.check_tensor(_SPARSE_OP, "logits", logits, _checks.FLOAT_DTYPES)
    if logits.dim() < 1:
        raise ValueError(f"{_SPARSE_OP}: logits must have at least one dimension (the classes)")
    _checks.check_reduction(_SPARSE_OP, reduction)
    index, bad_rows = _check_positives(_SPARSE_OP, pos_index, logits.shape[-1], logits.shape[:-1], logits.device)
    backend = _dispatch.select(_SPARSE_OP, logits.device.type,
                               lambda b: _dispatch.kernel_reason(_registry.ZLPR, b, logits, "logits"))
    shape_2d = (math.prod(logits.shape[:-1]), logits.shape[-1])
    if backend == "reference":
        rows = reference.sparse_multilabel_ce(logits.reshape(shape_2d).to(loss_dtype(logits)), index, "none")
    else:
        kernels = _registry.ZLPR.kernels(backend)
        rows = _SparseMultilabelCEFunction.apply(logits.reshape(shape_2d).contiguous(), index, kernels)
    return _checks.reduce(_nan_rows(rows, bad_rows).reshape(logits.shape[:-1]), reduction, loss_dtype(logits))


# ---- fused linear + ZLPR -------------------------------------------------------------------------


def _rows_per_chunk(n_classes, chunk_size):
    if chunk_size is not None:
        return chunk_size
    return max(1, FUSED_CHUNK_BYTES // (4 * max(n_classes, 1)))


def _workspace(key, shape, dtype, device):
    if device.type == "cpu":  # reused memory avoids the page faults of fresh memory (fastnotes.buffers)
        return _buffers.empty(key, shape, dtype)
    return torch.empty(shape, dtype=dtype, device=device)


def _stream_label_loss(hidden, weight, bias, targets, pos_index, kernels, rows_per_chunk, row_scale, needs,
                       lse=None):
    """One pass over row chunks of hidden: logits chunk = hidden[rows] @ weight.T + bias (a GEMM into a
    reused buffer), the kernel turns it in place into row_scale * dL/dlogits, and two more GEMMs add
    the chunk's share of the gradients. The [N, C] logits never exist.
    needs = (hidden, weight, bias) flags. lse: optional [N, 2] (LA, LB) of the rows, known beforehand
    (fastnotes.distributed combines them over label shards): the kernel takes them instead of this
    weight's own. Returns (loss rows [N] float32/64, lse [N, 2], bad-target count, grad_hidden,
    grad_weight, grad_bias), gradients None where not needed."""
    n_rows, n_classes = hidden.shape[0], weight.shape[0]
    compute = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    device = hidden.device
    any_grad = any(needs)
    loss = torch.empty(n_rows, dtype=compute, device=device)
    lse_out = torch.empty(n_rows, 2, dtype=compute, device=device)
    n_bad = 0
    grad_hidden = _workspace("fused_linear.grad_hidden", hidden.shape, hidden.dtype, device) if needs[0] else None
    grad_weight = _workspace("fused_linear.grad_weight", weight.shape, compute, device).zero_() if needs[1] else None
    grad_bias = torch.zeros(n_classes, dtype=compute, device=device) if needs[2] else None
    rows = max(1, min(rows_per_chunk, n_rows))
    chunk = _workspace("fused_linear.logits", (rows, n_classes), compute, device)
    for lo in range(0, n_rows, rows):
        hi = min(lo + rows, n_rows)
        h = hidden[lo:hi]
        logits = chunk[:hi - lo]
        if hidden.dtype == compute:
            if bias is None:
                torch.mm(h, weight.t(), out=logits)
            else:
                torch.addmm(bias, h, weight.t(), out=logits)
        else:  # float16/bfloat16 GEMM, float32 epilogue
            logits.copy_(torch.nn.functional.linear(h, weight, bias))
        rows_loss, rows_lse, bad = kernels.chunk_loss_and_grad(
            logits, None if targets is None else targets[lo:hi], None if pos_index is None else pos_index[lo:hi],
            row_scale[lo:hi] if any_grad else torch.zeros(hi - lo, dtype=compute, device=device), any_grad,
            lse=None if lse is None else lse[lo:hi])
        loss[lo:hi] = rows_loss
        lse_out[lo:hi] = rows_lse
        n_bad = n_bad + bad
        if not any_grad:
            continue
        grad_logits = logits  # overwritten in place by the kernel
        if needs[0]:
            torch.mm(grad_logits.to(weight.dtype), weight, out=grad_hidden[lo:hi])
        if needs[1]:
            grad_weight.addmm_(grad_logits.t(), h.to(compute))
        if needs[2]:
            grad_bias += grad_logits.sum(0)
    return loss, lse_out, n_bad, grad_hidden, grad_weight, grad_bias


class _FusedLinearMultilabelCEFunction(torch.autograd.Function):
    """Reduced (or per-row) ZLPR loss of hidden @ weight.T + bias, streamed over row chunks.

    'mean'/'sum' with gradients needed: the forward computes the gradients as it goes (three GEMMs
    in all, as with materialised logits) and the backward only scales them by the upstream scalar.
    'none' cannot do that (dW = sum_n g_n dL_n/dW needs the per-row g_n): the forward computes the
    loss only and the backward streams again with the row scales g_n (one GEMM more)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, pos_index, reduction, rows_per_chunk, kernels, grad_enabled):
        # needs_input_grad says True under torch.no_grad too: grad_enabled is the caller's grad mode
        needs = tuple(grad_enabled and flag for flag in
                      (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]))
        eager = any(needs) and reduction != "none"
        n_rows = hidden.shape[0]
        compute = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        scale = torch.full((n_rows,), 1.0 / max(n_rows, 1) if reduction == "mean" else 1.0, dtype=compute,
                           device=hidden.device)
        loss, _, n_bad, *grads = _stream_label_loss(hidden, weight, bias, targets, pos_index, kernels,
                                                 rows_per_chunk, scale, needs if eager else (False,) * 3)
        if hidden.device.type == "cpu" and int(n_bad) > 0:
            raise ValueError(f"{_FUSED_OP}: targets must lie in [0, 1]; {int(n_bad)} value(s) do not")
        ctx.save_for_backward(hidden, weight, bias, targets, pos_index)
        ctx.needs, ctx.reduction, ctx.rows_per_chunk, ctx.kernels = needs, reduction, rows_per_chunk, kernels
        ctx.eager_grads = grads if eager else None
        if reduction == "none":
            return loss
        return loss.sum() if reduction == "sum" else loss.mean()

    @staticmethod
    @once_differentiable(_FUSED_OP)
    def backward(ctx, grad_loss):
        hidden, weight, bias, targets, pos_index = ctx.saved_tensors
        if ctx.eager_grads is not None:
            # scaled in place: these buffers belong to this call; a second backward streams again
            grads = [None if g is None else g.mul_(grad_loss) for g in ctx.eager_grads]
            ctx.eager_grads = None
        else:
            n_rows = hidden.shape[0]
            scale = grad_loss.expand(n_rows) / (n_rows if ctx.reduction == "mean" else 1)
            compute = torch.float64 if hidden.dtype == torch.float64 else torch.float32
            _, _, _, *grads = _stream_label_loss(hidden, weight, bias, targets, pos_index, ctx.kernels,
                                              ctx.rows_per_chunk, scale.to(compute).contiguous(), ctx.needs)
        grad_hidden, grad_weight, grad_bias = grads
        return (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype), None, None, None, None, None, None)


def _check_fused_arguments(hidden, weight, targets, pos_index, bias, reduction, chunk_size):
    op = _FUSED_OP
    _checks.check_tensor(op, "hidden", hidden, _checks.FLOAT_DTYPES)
    _checks.check_tensor(op, "weight", weight, (hidden.dtype,))
    if hidden.dim() < 1:
        raise ValueError(f"{op}: hidden must be [..., D], got a scalar")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{op}: weight must be [C, D] with D = {hidden.shape[-1]} (hidden's last dimension), "
                         f"got {tuple(weight.shape)}")
    if bias is not None:
        _checks.check_tensor(op, "bias", bias, (hidden.dtype,))
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{op}: bias must be [C] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    if (targets is None) == (pos_index is None):
        raise ValueError(f"{op}: give exactly one of targets (dense [..., C]) and pos_index ([..., K])")
    if targets is not None:
        _checks.check_tensor(op, "targets", targets)
        if targets.dtype.is_complex:
            raise TypeError(f"{op}: targets must be bool, integer or floating, got {targets.dtype}")
        expected = tuple(hidden.shape[:-1]) + (weight.shape[0],)
        if tuple(targets.shape) != expected:
            raise ValueError(f"{op}: targets must have shape {expected}, got {tuple(targets.shape)}")
        if targets.requires_grad:
            raise ValueError(f"{op}: no gradient for targets (use multilabel_ce on materialised logits for "
                             "learned soft targets); pass targets.detach()")
    _checks.check_same_device(op, "hidden", hidden, weight=weight, bias=bias, targets=targets)
    _checks.check_reduction(op, reduction)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{op}: chunk_size must be a positive int (rows per chunk) or None, got {chunk_size!r}")


@_dispatch.eager_op
def fused_linear_multilabel_ce(hidden, weight, targets=None, *, pos_index=None, bias=None, reduction="mean",
                               chunk_size=None):
    """ZLPR loss of the logits hidden @ weight.T + bias without ever holding them: for extreme
    multi-label heads (C up to millions of labels).

    Equal to multilabel_ce(F.linear(hidden, weight, bias), targets) (or sparse_multilabel_ce with
    pos_index), with gradients for hidden, weight and bias. Rows of hidden are processed in chunks:
    one GEMM gives the chunk's logits, a fused kernel turns them in place into the loss and
    dL/dlogits, and two more GEMMs add the chunk's share of the gradients. Extra memory is one
    [chunk, C] buffer plus the gradients themselves. With reduction 'mean' or 'sum' the gradients are
    computed during the forward (when any input requires grad) and only scaled in backward; with
    'none' the backward recomputes the logits (one GEMM more).

    Args:
        hidden: [..., D] float32/float16/bfloat16 (float64 on CPU).
        weight: [C, D], hidden's dtype.
        targets: dense [..., C] bool/int/float targets in [0, 1] (hard or soft); or
        pos_index: [..., K] positive class indices padded with -1 (give exactly one of the two).
        bias: optional [C], hidden's dtype.
        reduction: 'mean' | 'sum' over rows, or 'none' for a [...] tensor.
        chunk_size: rows of hidden per chunk; default: about FUSED_CHUNK_BYTES of float32 logits.

    Under torch.autocast the GEMMs run in autocast's dtype, as F.linear would, and the loss comes out
    float32, as torch's losses do. Targets get no gradient: targets that require grad raise.
    """
    low_precision = isinstance(hidden, torch.Tensor) and autocast_dtype(hidden.device)
    if low_precision:
        # as autocast runs F.linear: the GEMMs in its dtype (the epilogue accumulates in float32)
        hidden, weight, bias = (x if not isinstance(x, torch.Tensor) or x.dtype not in AUTOCAST_CASTS
                                else x.to(low_precision) for x in (hidden, weight, bias))
        with autocast_off(hidden.device):
            return _fused_linear_multilabel_ce(hidden, weight, targets, pos_index, bias, reduction, chunk_size,
                                               torch.float32 if hidden.dtype in AUTOCAST_CASTS else hidden.dtype)
    return _fused_linear_multilabel_ce(hidden, weight, targets, pos_index, bias, reduction, chunk_size,
                                       getattr(hidden, "dtype", None))


def _fused_linear_multilabel_ce(hidden, weight, targets, pos_index, bias, reduction, chunk_size, loss_dtype):
    _check_fused_arguments(hidden, weight, targets, pos_index, bias, reduction, chunk_size)
    lead = hidden.shape[:-1]
    n_rows, n_classes = math.prod(lead), weight.shape[0]
    index, bad_rows = (None, None) if pos_index is None else \
        _check_positives(_FUSED_OP, pos_index, n_classes, lead, hidden.device)
    backend = _dispatch.select(_FUSED_OP, hidden.device.type,
                               lambda b: _dispatch.kernel_reason(_registry.ZLPR, b, hidden, "hidden"))
    hidden_2d = hidden.reshape(n_rows, hidden.shape[-1])
    dense = None if targets is None else targets.reshape(n_rows, n_classes)
    if backend == "reference":
        if dense is not None and dense.dtype != torch.bool and bool(((dense < 0) | (dense > 1) | dense.isnan()).any()):
            raise ValueError(f"{_FUSED_OP}: targets must lie in [0, 1]")
        rows = reference.fused_linear_multilabel_ce(hidden_2d, weight, dense, index, bias, "none")
        rows = _nan_rows(rows, bad_rows)
        return _checks.reduce(rows.reshape(lead), reduction, loss_dtype)
    kernels = _registry.ZLPR.kernels(backend)
    if dense is not None:
        dense = dense.contiguous()
    if bad_rows is not None and reduction != "none":
        # NaN rows must reach the reduced loss too: take the per-row path and reduce here
        rows = _FusedLinearMultilabelCEFunction.apply(hidden_2d.contiguous(), weight, bias, dense, index, "none",
                                                      _rows_per_chunk(n_classes, chunk_size), kernels,
                                                      torch.is_grad_enabled())
        return _checks.reduce(_nan_rows(rows, bad_rows).reshape(lead), reduction, loss_dtype)
    out = _FusedLinearMultilabelCEFunction.apply(hidden_2d.contiguous(), weight, bias, dense, index, reduction,
                                                 _rows_per_chunk(n_classes, chunk_size), kernels, torch.is_grad_enabled())
    if reduction == "none":
        return _nan_rows(out, bad_rows).reshape(lead).to(loss_dtype)
    return out.to(loss_dtype)


class FusedLinearMultilabelCE(torch.nn.Module):
    """A linear multi-label head trained with ZLPR, fused: holds weight [C, D] (and bias [C]) and
    returns fused_linear_multilabel_ce(hidden, weight, targets, pos_index=..., bias=...). Predict
    with `logits(hidden) > 0` (sigmoid(2 s) is the calibrated probability)."""

    def __init__(self, in_features, num_labels, bias=True, reduction="mean", chunk_size=None, device=None,
                 dtype=None):
        super().__init__()
        _checks.check_reduction("FusedLinearMultilabelCE", reduction)
        linear = torch.nn.Linear(in_features, num_labels, bias=bias, device=device, dtype=dtype)
        self.weight = linear.weight
        self.bias = linear.bias
        self.reduction = reduction
        self.chunk_size = chunk_size

    def forward(self, hidden, targets=None, pos_index=None):
        return fused_linear_multilabel_ce(hidden, self.weight, targets, pos_index=pos_index, bias=self.bias,
                                          reduction=self.reduction, chunk_size=self.chunk_size)

    def logits(self, hidden):
        """The scores hidden @ weight.T + bias (materialised: for inference on a few rows)."""
        return torch.nn.functional.linear(hidden, self.weight, self.bias)

    def extra_repr(self):
        return (f"in_features={self.weight.shape[1]}, num_labels={self.weight.shape[0]}, "
                f"bias={self.bias is not None}, reduction={self.reduction!r}")
