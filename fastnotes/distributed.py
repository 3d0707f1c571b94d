"""A label-parallel fused linear + ZLPR head over a torch.distributed process group (docs/zlpr.md,
"Label-parallel head"; ../shared/DESIGN.md, "Multiple devices").

The head's weight [C, D] (and bias [C]) is split by label: rank r of the group holds the contiguous
rows [offset_r, offset_r + C_r). A row's loss needs only LA = log(1 + S_pos) and LB = log(1 + S_neg),
S_pos = sum_pos e^{-s}, S_neg = sum_neg e^{s}, and the sums split over the shards: from each shard's
own L_r = log(1 + S_r), log(1 + sum_r S_r) with log S_r = L_r + log(-expm1(-L_r)). So every rank
  1. streams its shard through the single-process op's fused kernel without gradients: its L_r [N, 2],
  2. combines them with one all-reduce (max) and one (sum) of [N, 2] numbers each (never [N, C]),
  3. streams again with the combined (LA, LB) handed to the kernel: its loss and gradients, with the
     O(chunk) working memory of fastnotes.fused_linear_multilabel_ce (one GEMM more than it),
  4. and in backward sums dL/dhidden over the shards: an all-reduce when hidden is replicated, a
     reduce-scatter to the rows' owners when each rank brings its own batch ('data_parallel').
Arguments are checked on every rank and agreed (one all_gather_object) before the first collective
that carries data, so bad input raises the same error on every rank instead of hanging.
"""
import math
from dataclasses import dataclass

import torch

from . import _checks, _dispatch, _distributed, _registry
from ._autograd import AUTOCAST_CASTS, autocast_dtype, autocast_off, once_differentiable
from .zlpr import _check_positives, _rows_per_chunk, _stream_label_loss

_OP = "label_parallel_multilabel_ce"
INPUTS = ("replicated", "data_parallel")


def shard_of(num_labels, rank, world):
    """(offset, size) of `rank`'s contiguous share of `num_labels` labels over `world` ranks: the
    first num_labels % world ranks get one label more (torch.tensor_split's split)."""
    for name, value in (("num_labels", num_labels), ("rank", rank), ("world", world)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"shard_of: {name} must be an int, got {type(value).__name__}")
    if world < 1 or not 0 <= rank < world or num_labels < 0:
        raise ValueError(f"shard_of: need num_labels >= 0 and 0 <= rank < world, got {num_labels}, {rank}, {world}")
    base, extra = divmod(num_labels, world)
    return rank * base + min(rank, extra), base + (rank < extra)


@dataclass
class _Plan:
    """What the autograd function needs besides tensors; agreed by every rank of the group."""
    group: object
    world: int
    mode: str
    counts: list          # rows each rank brings (data_parallel) or the N all share (replicated)
    reduction: str
    rows_per_chunk: int
    kernels: object
    grad_enabled: bool


def _combine(shard_lse, n_bad, plan):
    """The rows' (LA, LB) [N, 2] over all shards from this shard's log(1 + S_r): one all-reduce of
    the maxima, one of the sums (with the bad-target counts, so every rank raises alike)."""
    dist = torch.distributed
    log_s = shard_lse.to(torch.float64).clamp(min=0.0)
    log_s = log_s + torch.log(-torch.expm1(-log_s))  # log S_r; -inf for a shard with no terms
    top = log_s.clamp(min=0.0)                         # the appended zero logit takes part once
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=plan.group)
    # terms equal to the maximum count 1: +inf stays +inf (exp(inf - inf) would be NaN)
    terms = torch.where(log_s == top, 1.0, torch.exp(log_s - top))
    packed = torch.cat([terms.reshape(-1), torch.tensor([float(n_bad)], dtype=torch.float64, device=top.device)])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=plan.group)
    total_bad = int(packed[-1])
    if total_bad:
        raise ValueError(f"{_OP}: targets must lie in [0, 1]; {total_bad} value(s) over the group do not")
    sums = packed[:-1].view(terms.shape)
    return top + torch.log(torch.exp(-top) + sums)


class _LabelParallelFunction(torch.autograd.Function):
    """The reduced (or per-row) loss of this rank's label shard, with the shards' statistics
    combined. As in _FusedLinearMultilabelCEFunction, 'mean'/'sum' compute the gradients during the
    forward and the backward only scales them (then sums dL/dhidden over the group); 'none' streams
    again in backward with the per-row upstream gradients."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, index, plan):
        needs = tuple(plan.grad_enabled and flag for flag in
                      (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]))
        rows = hidden if plan.mode == "replicated" else _distributed.all_gather_rows(hidden, plan.counts, plan.group)
        n_rows = rows.shape[0]
        compute = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        no_scale = torch.zeros(n_rows, dtype=compute, device=hidden.device)
        _, shard_lse, n_bad, *_ = _stream_label_loss(rows, weight, bias, targets, index, plan.kernels,
                                                     plan.rows_per_chunk, no_scale, (False,) * 3)
        lse = _combine(shard_lse, n_bad, plan).to(compute)
        eager = any(needs) and plan.reduction != "none"
        if eager:
            scale = torch.full((n_rows,), 1.0 / max(n_rows, 1) if plan.reduction == "mean" else 1.0,
                               dtype=compute, device=hidden.device)
            *_, grad_hidden, grad_weight, grad_bias = _stream_label_loss(
                rows, weight, bias, targets, index, plan.kernels, plan.rows_per_chunk, scale, needs, lse=lse)
            ctx.eager_grads = [grad_hidden, grad_weight, grad_bias]
        else:
            ctx.eager_grads = None
        ctx.saved = (rows, weight, bias, targets, index, lse)  # for 'none', or a second backward
        ctx.needs, ctx.plan, ctx.dtypes = needs, plan, (weight.dtype, None if bias is None else bias.dtype)
        loss = lse.sum(1)
        if plan.reduction == "none":
            return loss
        return loss.sum() if plan.reduction == "sum" else loss.mean()

    @staticmethod
    @once_differentiable(_OP)
    def backward(ctx, grad_loss):
        plan = ctx.plan
        if ctx.eager_grads is not None:
            grads = [None if g is None else g.mul_(grad_loss) for g in ctx.eager_grads]
            ctx.eager_grads = None
        else:  # 'none' (replicated only: every rank brings the same per-row upstream gradients)
            rows, weight, bias, targets, index, lse = ctx.saved
            n_rows = rows.shape[0]
            scale = grad_loss.to(lse.dtype).expand(n_rows) / (max(n_rows, 1) if plan.reduction == "mean" else 1)
            scale = scale.contiguous()
            *_, grad_hidden, grad_weight, grad_bias = _stream_label_loss(
                rows, weight, bias, targets, index, plan.kernels, plan.rows_per_chunk, scale, ctx.needs, lse=lse)
            grads = [grad_hidden, grad_weight, grad_bias]
        grad_hidden, grad_weight, grad_bias = grads
        if grad_hidden is not None:
            # each rank holds the part of dL/dhidden that its labels give: sum the parts
            if plan.mode == "replicated":
                torch.distributed.all_reduce(grad_hidden, op=torch.distributed.ReduceOp.SUM, group=plan.group)
            else:
                # to the rows' owners; times the group size, as Partial FC does, so that the
                # backbone's data-parallel gradient average (DDP, FSDP) gives the exact gradient
                grad_hidden = _distributed.reduce_scatter_rows(grad_hidden, plan.counts, plan.group) * plan.world
        weight_dtype, bias_dtype = ctx.dtypes
        return (grad_hidden, None if grad_weight is None else grad_weight.to(weight_dtype),
                None if grad_bias is None else grad_bias.to(bias_dtype), None, None, None)


def _check_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{_OP}: {name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{_OP}: {name} must be >= {low}, got {value}")


def _check_local(hidden, weight, targets, pos_index, bias, label_offset, num_labels, mode, reduction, chunk_size):
    """This rank's own checks (no communication). Returns (rows, index [N, K] int64 or None)."""
    if mode not in INPUTS:
        raise ValueError(f"{_OP}: input must be one of {INPUTS}, got {mode!r}")
    _checks.check_reduction(_OP, reduction)
    if mode == "data_parallel" and reduction == "none":
        raise ValueError(f"{_OP}: reduction='none' needs input='replicated' (with a data-parallel batch each rank "
                         "would need every rank's upstream gradients); use 'mean' or 'sum'")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{_OP}: chunk_size must be a positive int (rows per chunk) or None, got {chunk_size!r}")
    _check_int("num_labels", num_labels, 1)
    _check_int("label_offset", label_offset, 0)
    _checks.check_tensor(_OP, "hidden", hidden, _checks.FLOAT_DTYPES)
    _checks.check_tensor(_OP, "weight", weight, (hidden.dtype,))
    if hidden.dim() < 1:
        raise ValueError(f"{_OP}: hidden must be [..., D], got a scalar")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{_OP}: weight (this rank's shard) must be [C_local, D] with D = {hidden.shape[-1]} "
                         f"(hidden's last dimension), got {tuple(weight.shape)}")
    if label_offset + weight.shape[0] > num_labels:
        raise ValueError(f"{_OP}: this rank's labels [{label_offset}, {label_offset + weight.shape[0]}) do not lie "
                         f"in [0, num_labels = {num_labels})")
    if bias is not None:
        _checks.check_tensor(_OP, "bias", bias, (hidden.dtype,))
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{_OP}: bias (this rank's shard) must be [C_local] = [{weight.shape[0]}], "
                             f"got {tuple(bias.shape)}")
    if (targets is None) == (pos_index is None):
        raise ValueError(f"{_OP}: give exactly one of targets (dense, this rank's label columns) and pos_index")
    lead = tuple(hidden.shape[:-1])
    rows = math.prod(lead)
    if targets is not None:
        _checks.check_tensor(_OP, "targets", targets)
        if targets.dtype.is_complex:
            raise TypeError(f"{_OP}: targets must be bool, integer or floating, got {targets.dtype}")
        if targets.requires_grad:
            raise ValueError(f"{_OP}: no gradient for targets; pass targets.detach()")
        if mode == "replicated" and tuple(targets.shape) != lead + (weight.shape[0],):
            raise ValueError(f"{_OP}: targets must be [..., C_local] = {lead + (weight.shape[0],)} (this rank's "
                             f"label columns), got {tuple(targets.shape)}")
        if mode == "data_parallel" and (targets.dim() != 2 or targets.shape[1] != weight.shape[0]):
            raise ValueError(f"{_OP}: with input='data_parallel', targets must be [N_group, C_local] (every rank's "
                             f"rows in rank order, this rank's label columns), got {tuple(targets.shape)}")
    _checks.check_same_device(_OP, "hidden", hidden, weight=weight, bias=bias, targets=targets, pos_index=pos_index)
    index = None
    if pos_index is not None:
        index, bad_rows = _check_positives(_OP, pos_index, num_labels, lead, hidden.device)
        if bad_rows is not None and bool(bad_rows.any()):  # on GPU: a host sync, but never a NaN that one rank hides
            raise ValueError(f"{_OP}: pos_index entries must lie in [0, {num_labels}) or be -1 (padding), each class "
                             f"once per row; row {int(bad_rows.nonzero()[0])} does not")
    return rows, index


def _agree(metas, mode):
    """Checks on every rank's (identical) view of the group: raises the same error everywhere."""
    first = metas[0]
    for key in ("num_labels", "dim", "dtype", "device", "input", "reduction", "dense", "bias", "grad_hidden"):
        values = [m[key] for m in metas]
        if any(v != values[0] for v in values):
            raise ValueError(f"{_OP}: the ranks of the group disagree on {key}: {values} (in group rank order)")
    if mode == "replicated" and any(m["rows"] != first["rows"] for m in metas):
        raise ValueError(f"{_OP}: with input='replicated' every rank must bring the same rows of hidden; rows per "
                         f"rank: {[m['rows'] for m in metas]}")
    shards = sorted((m["offset"], m["offset"] + m["size"], rank) for rank, m in enumerate(metas))
    end = 0
    for lo, hi, rank in shards:
        if lo != end:
            raise ValueError(f"{_OP}: the label shards [offset, offset + C_local) of the group do not tile "
                             f"[0, num_labels = {first['num_labels']}): rank {rank} starts at {lo}, expected {end} "
                             f"(shards in group rank order: {[(m['offset'], m['size']) for m in metas]})")
        end = hi
    if end != first["num_labels"]:
        raise ValueError(f"{_OP}: the label shards of the group cover [0, {end}), not [0, num_labels = "
                         f"{first['num_labels']}): was the weight sharded over another group?")
    if first["dense"]:
        total = sum(m["rows"] for m in metas) if mode == "data_parallel" else first["rows"]
        bad = [rank for rank, m in enumerate(metas) if m["target_rows"] != total]
        if bad:
            raise ValueError(f"{_OP}: dense targets must have {total} rows (the rows the head sees); rank(s) {bad} "
                             "do not")


@_dispatch.eager_op
def label_parallel_multilabel_ce(hidden, weight, targets=None, *, pos_index=None, bias=None, label_offset,
                                 num_labels, group=None, input="replicated", reduction="mean", chunk_size=None):
    """fastnotes.fused_linear_multilabel_ce with the head's labels split over a process group.

    Every rank of `group` calls this together, with its own contiguous shard of the weight: rows
    [label_offset, label_offset + C_local) of the full [num_labels, D] head (shard_of gives an even
    split; uneven shards are fine as long as the group's shards tile [0, num_labels)). The result is
    the single-process op on the concatenated weight, on every rank: the same loss, and the
    gradients of this rank's weight and bias shards. Per rank: the fused kernels and O(chunk) memory
    of the single-process op; between ranks: O(N) statistics per row batch, never [N, C] logits.

    Args:
        hidden: [..., D] float32/float16/bfloat16 (float64 on CPU). With input='replicated' every
            rank brings the same rows (tensor parallel); with input='data_parallel' each rank brings
            its own batch (any number of rows), all-gathered in the forward (the Partial FC layout).
        weight: [C_local, D] this rank's shard, hidden's dtype.
        targets: dense targets in [0, 1] for this rank's label columns: [..., C_local] with
            'replicated', [N_group, C_local] (all ranks' rows in rank order) with 'data_parallel'; or
        pos_index: [..., K] GLOBAL positive label ids of this rank's rows, padded with -1 (K may
            differ between ranks). Give exactly one of the two.
        bias: optional [C_local] shard, hidden's dtype.
        label_offset, num_labels: the shard's first label and the head's total label count.
        group: the torch.distributed process group (None: the default group).
        input: 'replicated' or 'data_parallel', as above.
        reduction: 'mean' | 'sum' over all rows the head sees; 'none' (replicated only) gives [...].
        chunk_size: rows per chunk; default: about zlpr.FUSED_CHUNK_BYTES of float32 logits of the shard.

    The loss is the same number on every rank, and every rank must run backward on it (the backward
    holds a collective). dL/dhidden is summed over the label shards: with 'replicated' it is the
    full gradient on every rank; with 'data_parallel' each rank gets its own rows' gradient times
    the group size, so that the data-parallel backbone's gradient average (DDP, FSDP) gives exactly
    the gradient of the loss (insightface's Partial FC convention). Bad input (labels outside
    [0, num_labels), shards that do not tile the labels, ranks that disagree) raises the same
    ValueError/TypeError on every rank, before any collective that carries data.
    """
    low_precision = isinstance(hidden, torch.Tensor) and autocast_dtype(hidden.device)
    if low_precision:  # as fused_linear_multilabel_ce: the GEMMs in autocast's dtype, the loss float32
        hidden, weight, bias = (x if not isinstance(x, torch.Tensor) or x.dtype not in AUTOCAST_CASTS
                                else x.to(low_precision) for x in (hidden, weight, bias))
        with autocast_off(hidden.device):
            return _label_parallel(hidden, weight, targets, pos_index, bias, label_offset, num_labels, group, input,
                                   reduction, chunk_size, torch.float32 if hidden.dtype in AUTOCAST_CASTS else None)
    return _label_parallel(hidden, weight, targets, pos_index, bias, label_offset, num_labels, group, input,
                           reduction, chunk_size, None)


def _label_parallel(hidden, weight, targets, pos_index, bias, label_offset, num_labels, group, mode, reduction,
                    chunk_size, loss_dtype):
    dist = torch.distributed
    if group is None and dist.is_available() and dist.is_initialized():
        group = dist.group.WORLD
    _, world = _distributed.check_group(_OP, group)  # a rank outside the group raises alone: nobody waits
    error, meta, index, kernels = None, None, None, None
    try:
        rows, index = _check_local(hidden, weight, targets, pos_index, bias, label_offset, num_labels, mode,
                                   reduction, chunk_size)
        backend = _dispatch.select(_OP, hidden.device.type,
                                   lambda b: _dispatch.kernel_reason(_registry.ZLPR, b, hidden, "hidden"))
        if backend == "reference":
            raise NotImplementedError(f"{_OP}: needs the fused kernels (numba on CPU, triton on GPU); the "
                                      "reference backend has no label-parallel form")
        kernels = _registry.ZLPR.kernels(backend)
        meta = dict(num_labels=num_labels, dim=hidden.shape[-1], dtype=str(hidden.dtype), device=hidden.device.type,
                    input=mode, reduction=reduction, dense=targets is not None, bias=bias is not None,
                    grad_hidden=torch.is_grad_enabled() and hidden.requires_grad, rows=rows,
                    offset=label_offset, size=weight.shape[0],
                    target_rows=None if targets is None else math.prod(targets.shape[:-1]),
                    k=None if index is None else index.shape[1])
    except (TypeError, ValueError, NotImplementedError, _dispatch.BackendUnsupportedError) as caught:
        error = caught
    metas = _distributed.gather_checked(_OP, group, error, meta)
    _agree(metas, mode)
    lead = tuple(hidden.shape[:-1])
    hidden_2d = hidden.reshape(rows, hidden.shape[-1]).contiguous()
    counts = [m["rows"] for m in metas]
    if index is not None:
        if mode == "data_parallel":
            widest = max(m["k"] for m in metas)
            padded = torch.full((rows, widest), -1, dtype=torch.int64, device=hidden.device)
            padded[:, :index.shape[1]] = index
            index = _distributed.all_gather_rows(padded, counts, group) if widest else \
                torch.empty(sum(counts), 0, dtype=torch.int64, device=hidden.device)
        # global ids -> this shard's columns; the other shards' positives become padding
        mine = (index >= label_offset) & (index < label_offset + weight.shape[0])
        index = torch.where(mine, index - label_offset, -1).contiguous()
    head_rows = sum(counts) if mode == "data_parallel" else rows  # explicit: a shard may have no labels
    dense = None if targets is None else targets.reshape(head_rows, weight.shape[0]).contiguous()
    plan = _Plan(group=group, world=world, mode=mode, counts=counts, reduction=reduction,
                 rows_per_chunk=_rows_per_chunk(weight.shape[0], chunk_size), kernels=kernels,
                 grad_enabled=torch.is_grad_enabled())
    out = _LabelParallelFunction.apply(hidden_2d, weight, bias, dense, index, plan)
    loss_dtype = loss_dtype or hidden.dtype
    return (out.reshape(lead) if reduction == "none" else out).to(loss_dtype)


class LabelParallelMultilabelCE(torch.nn.Module):
    """A linear multi-label ZLPR head whose labels are split over a process group: holds this rank's
    weight shard [C_local, D] (and bias shard) and returns label_parallel_multilabel_ce.

    LabelParallelMultilabelCE(in_features, num_labels, group=None, input="replicated") takes this
    rank's share from shard_of(num_labels, rank, world) of the group; from_full(weight, bias, ...)
    builds it from a full head (each rank keeps its rows), full_weight()/full_bias() gather it
    back (for a checkpoint of the whole head), and topk(hidden, k) predicts over all labels. Keep
    it out of DDP / FSDP wrappers of the backbone: its parameters are shards, not replicas, and
    their gradients are complete on each rank.
    """

    def __init__(self, in_features, num_labels, bias=True, *, group=None, input="replicated", reduction="mean",
                 chunk_size=None, device=None, dtype=None):
        super().__init__()
        dist = torch.distributed
        if group is None and dist.is_available() and dist.is_initialized():
            group = dist.group.WORLD
        rank, world = _distributed.check_group("LabelParallelMultilabelCE", group)
        for name, value in (("in_features", in_features), ("num_labels", num_labels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LabelParallelMultilabelCE: {name} must be a positive int, got {value!r}")
        if input not in INPUTS:
            raise ValueError(f"LabelParallelMultilabelCE: input must be one of {INPUTS}, got {input!r}")
        _checks.check_reduction("LabelParallelMultilabelCE", reduction)
        self.group, self.input, self.reduction, self.chunk_size = group, input, reduction, chunk_size
        self.num_labels = num_labels
        self.label_offset, size = shard_of(num_labels, rank, world)
        linear = torch.nn.Linear(in_features, size, bias=bias, device=device, dtype=dtype)  # bounds from D alone
        self.weight = linear.weight
        self.bias = linear.bias

    @classmethod
    def from_full(cls, weight, bias=None, *, group=None, input="replicated", reduction="mean", chunk_size=None):
        """The head holding this rank's rows of a full [num_labels, D] weight (and [num_labels] bias),
        the same full tensors on every rank (e.g. loaded from a single-process checkpoint)."""
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"LabelParallelMultilabelCE.from_full: weight must be a [num_labels, D] tensor, got "
                             f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
        if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],)):
            raise ValueError(f"LabelParallelMultilabelCE.from_full: bias must be [num_labels] = [{weight.shape[0]}], "
                             f"got {tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
        module = cls(weight.shape[1], weight.shape[0], bias=bias is not None, group=group, input=input,
                     reduction=reduction, chunk_size=chunk_size, device=weight.device, dtype=weight.dtype)
        lo, hi = module.label_offset, module.label_offset + module.weight.shape[0]
        with torch.no_grad():
            module.weight.copy_(weight[lo:hi])
            if bias is not None:
                module.bias.copy_(bias[lo:hi])
        return module

    def forward(self, hidden, targets=None, pos_index=None):
        return label_parallel_multilabel_ce(
            hidden, self.weight, targets, pos_index=pos_index, bias=self.bias, label_offset=self.label_offset,
            num_labels=self.num_labels, group=self.group, input=self.input, reduction=self.reduction,
            chunk_size=self.chunk_size)

    def logits(self, hidden):
        """This rank's label columns of hidden @ weight.T + bias, [..., C_local] (labels
        label_offset + j). For the best labels of the whole head, topk."""
        return torch.nn.functional.linear(hidden, self.weight, self.bias)

    @torch.no_grad()
    def topk(self, hidden, k):
        """The k highest-scoring labels of the whole head for each row: (scores [..., k], global
        label ids [..., k]), best first, on every rank. hidden as in forward (the same rows on every
        rank with input='replicated', this rank's own rows with 'data_parallel'). Each rank scores
        its shard a chunk of rows at a time and keeps its top k; the group then exchanges k
        candidates per row and rank (never [N, C])."""
        op = "LabelParallelMultilabelCE.topk"
        error, meta = None, None
        try:
            _check_int("k", k, 1)
            if k > self.num_labels:
                raise ValueError(f"{op}: k = {k} exceeds num_labels = {self.num_labels}")
            _checks.check_tensor(op, "hidden", hidden, (self.weight.dtype,))
            if hidden.dim() < 1 or hidden.shape[-1] != self.weight.shape[1]:
                raise ValueError(f"{op}: hidden must be [..., {self.weight.shape[1]}], got {tuple(hidden.shape)}")
            meta = math.prod(hidden.shape[:-1])
        except (TypeError, ValueError) as caught:
            error = caught
        counts = _distributed.gather_checked(op, self.group, error, meta)
        if self.input == "replicated" and any(n != counts[0] for n in counts):
            raise ValueError(f"{op}: with input='replicated' every rank must bring the same rows; "
                             f"rows per rank: {counts}")
        lead = tuple(hidden.shape[:-1])
        rows = hidden.reshape(-1, hidden.shape[-1])
        if self.input == "data_parallel":
            rows = _distributed.all_gather_rows(rows.contiguous(), counts, self.group)
        n_rows, world = rows.shape[0], len(counts)
        compute = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        scores = torch.full((n_rows, k), -math.inf, dtype=compute, device=rows.device)
        ids = torch.full((n_rows, k), -1, dtype=torch.int64, device=rows.device)
        mine = min(k, self.weight.shape[0])  # a shard smaller than k pads with -inf
        step = _rows_per_chunk(self.weight.shape[0], self.chunk_size)
        for lo in range(0, n_rows, step):
            logits = torch.nn.functional.linear(rows[lo:lo + step], self.weight, self.bias).to(compute)
            top = logits.topk(mine, dim=1)
            scores[lo:lo + step, :mine] = top.values
            ids[lo:lo + step, :mine] = top.indices + self.label_offset
        every = [_distributed.all_gather_rows(x, [n_rows] * world, self.group).view(world, n_rows, k)
                 for x in (scores, ids)]
        candidates = [x.permute(1, 0, 2).reshape(n_rows, world * k) for x in every]
        best = candidates[0].topk(k, dim=1)
        top_ids = candidates[1].gather(1, best.indices)
        top_scores = best.values.to(hidden.dtype)
        if self.input == "data_parallel":
            rank = torch.distributed.get_rank(self.group)
            start = sum(counts[:rank])
            top_scores, top_ids = top_scores[start:start + counts[rank]], top_ids[start:start + counts[rank]]
        return top_scores.reshape(lead + (k,)), top_ids.reshape(lead + (k,))

    def full_weight(self):
        """The whole [num_labels, D] weight on every rank (an all-gather: for checkpoints and tests)."""
        return _gather_shards(self.weight.detach(), self.num_labels, self.group)

    def full_bias(self):
        """The whole [num_labels] bias on every rank, or None."""
        return None if self.bias is None else _gather_shards(self.bias.detach(), self.num_labels, self.group)

    def extra_repr(self):
        return (f"in_features={self.weight.shape[1]}, num_labels={self.num_labels}, "
                f"labels=[{self.label_offset}, {self.label_offset + self.weight.shape[0]}), "
                f"bias={self.bias is not None}, input={self.input!r}, reduction={self.reduction!r}")


def _gather_shards(shard, num_labels, group):
    world = torch.distributed.get_world_size(group)
    counts = [shard_of(num_labels, r, world)[1] for r in range(world)]
    return _distributed.all_gather_rows(shard.contiguous(), counts, group)
