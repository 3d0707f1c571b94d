"""The label-parallel ZLPR head (fastnotes.distributed) on gloo: W spawned processes (world sizes 2
and 3, so label shards and data-parallel batches are uneven) against the single-process fused op on
the concatenated weight and batch, float64 (only summation orders differ) and float32 (the
oracle rule against the float64 composite); bad input raises the same error on every rank, and the
group stays usable afterwards (no rank left waiting in a collective)."""
import math

import pytest
import torch
import torch.distributed as dist
from distributed_cases import spawn as _spawn
from conftest import available_backends
from oracle import FLOORS, assert_close_to_oracle

from fastnotes import _dispatch

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

N, D, C, K = 9, 6, 11, 4   # 11 labels: shards (6, 5) at world 2, (4, 4, 3) at world 3


def _case(seed, dtype):
    """hidden [N, D], weight [C, D], bias [C], pos_index [N, K] (global ids, -1 padding), soft dense
    targets [N, C]. Row 0's positives all lie in the last labels (the last rank's shard), row 1 has
    none, row 2 only label 0 (the first shard): the other shards see rows without positives."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=gen, dtype=torch.float64)
    weight = torch.randn(C, D, generator=gen, dtype=torch.float64) * 2 / math.sqrt(D)
    bias = torch.randn(C, generator=gen, dtype=torch.float64) - 1
    pos_index = torch.stack([torch.randperm(C, generator=gen)[:K] for _ in range(N)])
    pos_index[0] = torch.tensor([C - 1, C - 2, -1, -1])
    pos_index[1] = -1
    pos_index[2] = torch.tensor([-1, 0, -1, -1])
    pos_index[3::3, K // 2:] = -1
    soft = torch.rand(N, C, generator=gen, dtype=torch.float64)
    dense = torch.zeros(N, C, dtype=torch.float64).scatter_(1, pos_index.clamp(min=0), 1.0)
    dense[1] = 0
    dense = torch.where(torch.rand(N, C, generator=gen, dtype=torch.float64) < 0.6, dense, soft)
    return [x.to(dtype) for x in (hidden, weight, bias)] + [pos_index, dense.to(dtype)]


def _grads(fn, hidden, weight, bias, upstream, **kwargs):
    """(loss, grad hidden, grad weight, grad bias) of fn on fresh leaves."""
    h, w, b = (x.detach().clone().requires_grad_() for x in (hidden, weight, bias))
    loss = fn(h, w, b, **kwargs)
    loss.backward(upstream.to(loss.dtype) if loss.dim() else None)
    return [loss.detach(), h.grad, w.grad, b.grad]


def _single(h, w, b, targets=None, pos_index=None, reduction="mean"):
    import fastnotes
    return fastnotes.fused_linear_multilabel_ce(h, w, targets, pos_index=pos_index, bias=b, reduction=reduction)


def _composite(h, w, b, targets=None, pos_index=None, reduction="mean"):
    from fastnotes import reference
    return reference.fused_linear_multilabel_ce(h, w, targets, pos_index, b, reduction)


def _split_rows(world):
    """Uneven data-parallel batches: rank r brings counts[r] of the N rows."""
    counts = [N // world + (1 if r < N % world else 0) for r in range(world)]
    counts[0], counts[-1] = counts[0] + 1, counts[-1] - 1
    starts = [sum(counts[:r]) for r in range(world)]
    return counts, starts


def _check_against_single(rank, world, dtype, mode, kind, reduction):
    from fastnotes.distributed import label_parallel_multilabel_ce, shard_of
    hidden, weight, bias, pos_index, dense = _case(10 + world, dtype)
    lo, size = shard_of(C, rank, world)
    labels = slice(lo, lo + size)
    upstream = torch.randn(N, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    rows = slice(None)
    if mode == "data_parallel":
        counts, starts = _split_rows(world)
        rows = slice(starts[rank], starts[rank] + counts[rank])
    # every rank computes the single-process op on the whole head and batch
    full = dict(pos_index=pos_index) if kind == "sparse" else dict(targets=dense)
    want = _grads(_single, hidden, weight, bias, upstream, reduction=reduction, **full)
    mine = dict(pos_index=pos_index[rows]) if kind == "sparse" else dict(targets=dense[:, labels])
    got = _grads(lambda h, w, b, **kw: label_parallel_multilabel_ce(
        h, w, bias=b, label_offset=lo, num_labels=C, input=mode, reduction=reduction, **kw, **mine),
        hidden[rows], weight[labels], bias[labels], upstream)
    # the data-parallel hidden gradient is the group size times the loss's (Partial FC convention)
    scale = world if mode == "data_parallel" else 1
    want_mine = [want[0], want[1][rows] * scale, want[2][labels], want[3][labels]]
    exact = _grads(_composite, hidden.double(), weight.double(), bias.double(), upstream, reduction=reduction,
                   **({"targets": dense.double()} if kind == "dense" else full))
    exact = [exact[0], exact[1][rows] * scale, exact[2][labels], exact[3][labels]]
    same = _grads(_composite, hidden, weight, bias, upstream, reduction=reduction, **full)
    same = [same[0], same[1][rows] * scale, same[2][labels], same[3][labels]]
    what = f"world {world} rank {rank} {dtype} {mode} {kind} {reduction}"
    for name, g, w, e, s in zip(("loss", "grad_hidden", "grad_weight", "grad_bias"), got, want_mine, exact, same):
        assert g.dtype == dtype and g.shape == w.shape, f"{what}: {name} {g.dtype} {tuple(g.shape)}"
        if dtype == torch.float64:  # the same sums as the single-process op, in another order
            err = (g - w).abs().max().item()
            assert err <= 1e-12 * (1 + w.abs().max().item()), f"{what}: {name} differs by {err:.3g}"
        else:
            assert_close_to_oracle(g, e, s, FLOORS[dtype], f"{what}: {name}")


def _check_module(rank, world):
    # from_full keeps this rank's rows, full_weight gathers them back; training steps of a DDP
    # backbone + a data-parallel head follow the single-process model on the whole batch
    import fastnotes
    from fastnotes.distributed import LabelParallelMultilabelCE
    from torch.nn.parallel import DistributedDataParallel
    hidden, weight, bias, pos_index, _ = _case(3, torch.float64)
    torch.manual_seed(0)
    backbone = torch.nn.Linear(D, D).double()
    single_backbone = torch.nn.Linear(D, D).double()
    single_backbone.load_state_dict(backbone.state_dict())
    single_head = fastnotes.FusedLinearMultilabelCE(D, C).double()
    with torch.no_grad():
        single_head.weight.copy_(weight)
        single_head.bias.copy_(bias)
    head = LabelParallelMultilabelCE.from_full(weight, bias, input="data_parallel")
    assert torch.equal(head.full_weight(), weight) and torch.equal(head.full_bias(), bias)
    ddp = DistributedDataParallel(backbone)
    counts, starts = _split_rows(world)
    rows = slice(starts[rank], starts[rank] + counts[rank])
    opt = torch.optim.SGD(list(ddp.parameters()) + list(head.parameters()), lr=0.5)
    single_opt = torch.optim.SGD(list(single_backbone.parameters()) + list(single_head.parameters()), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        single_opt.zero_grad()
        loss = head(ddp(hidden[rows]).tanh(), pos_index=pos_index[rows])
        want = single_head(single_backbone(hidden).tanh(), pos_index=pos_index)
        assert abs(loss.item() - want.item()) <= 1e-12 * (1 + abs(want.item()))
        loss.backward()
        want.backward()
        opt.step()
        single_opt.step()
    # uneven batches: DDP's mean of the ranks' gradients is exact under the group-size convention
    for got, exp in zip(list(backbone.parameters()) + [head.full_weight(), head.full_bias()],
                        list(single_backbone.parameters()) + [single_head.weight, single_head.bias]):
        assert (got.detach() - exp.detach()).abs().max().item() <= 1e-12


def _check_topk(rank, world):
    # the k best labels over all shards equal torch.topk of the full logits (shards smaller than k
    # included: k = 5 > 3 labels on the last rank at world 3), in both input modes
    from fastnotes.distributed import LabelParallelMultilabelCE
    hidden, weight, bias, _, _ = _case(8, torch.float64)
    want = torch.nn.functional.linear(hidden, weight, bias).topk(5, dim=1)
    counts, starts = _split_rows(world)
    for mode in ("replicated", "data_parallel"):
        head = LabelParallelMultilabelCE.from_full(weight, bias, input=mode, chunk_size=2)
        rows = slice(starts[rank], starts[rank] + counts[rank]) if mode == "data_parallel" else slice(None)
        scores, ids = head.topk(hidden[rows], 5)
        assert torch.equal(ids, want.indices[rows]), mode
        assert (scores - want.values[rows]).abs().max().item() <= 1e-12, mode


def _check_second_backward(rank, world):
    # retain_graph: a second backward (streaming again, collectives again) gives the same gradients
    from fastnotes.distributed import label_parallel_multilabel_ce, shard_of
    hidden, weight, bias, pos_index, _ = _case(4, torch.float64)
    lo, size = shard_of(C, rank, world)
    for mode in ("replicated", "data_parallel"):
        h = hidden[rank::world] if mode == "data_parallel" else hidden
        index = pos_index[rank::world] if mode == "data_parallel" else pos_index
        h, w = h.clone().requires_grad_(), weight[lo:lo + size].clone().requires_grad_()
        loss = label_parallel_multilabel_ce(h, w, pos_index=index, label_offset=lo, num_labels=C, input=mode)
        first = torch.autograd.grad(loss, (h, w), retain_graph=True)
        second = torch.autograd.grad(loss, (h, w))
        for a, b in zip(first, second):
            assert (a - b).abs().max().item() <= 1e-14 * (1 + a.abs().max().item()), mode


def _expect_error(kind, pattern, call):
    with pytest.raises(kind, match=pattern):
        call()


def _check_bad_input(rank, world):
    from fastnotes.distributed import label_parallel_multilabel_ce, shard_of
    hidden, weight, bias, pos_index, dense = _case(7, torch.float32)
    lo, size = shard_of(C, rank, world)
    shard = weight[lo:lo + size]

    def call(index=pos_index, offset=lo, w=shard, num_labels=C, group=None, h=hidden, **kwargs):
        return label_parallel_multilabel_ce(h, w, pos_index=index, label_offset=offset, num_labels=num_labels,
                                            group=group, **kwargs)

    last = rank == world - 1
    # a label outside [0, C) on the last rank only: every rank raises, naming the rank
    bad = pos_index.clone()
    if last:
        bad[4, 0] = C
    _expect_error(ValueError, rf"pos_index entries must lie in \[0, {C}\).*rank {world - 1}", lambda: call(bad))
    # shards that do not tile the labels: the last rank's shard one label short
    _expect_error(ValueError, "do not tile|cover", lambda: call(w=shard[:-1] if last else shard))
    # ranks that disagree on the label count and on D
    _expect_error(ValueError, "disagree on num_labels", lambda: call(num_labels=C + 1 if last else C))
    _expect_error(ValueError, "disagree on dim", lambda: call(h=hidden[:, :-1] if last else hidden,
                                                                w=shard[:, :-1] if last else shard))
    # replicated input with different row counts
    _expect_error(ValueError, "same rows", lambda: call(h=hidden[:-1] if last else hidden,
                                                        index=pos_index[:-1] if last else pos_index))
    # dense targets outside [0, 1] on one rank: found by the kernels, agreed in the combine
    targets = dense[:, lo:lo + size].clone()
    if last:
        targets[0, 0] = 2.0
    _expect_error(ValueError, "targets must lie in", lambda: label_parallel_multilabel_ce(
        hidden, shard, targets, label_offset=lo, num_labels=C))
    # a group mismatch: the weight sharded over the whole group, called over all ranks but the last
    fewer = dist.new_group(list(range(world - 1)))
    if last:
        _expect_error(ValueError, "does not contain this rank", lambda: call(group=fewer))
    else:
        _expect_error(ValueError, "do not tile|cover", lambda: call(group=fewer))
    # a local argument error on one rank (a bad input mode) reaches every rank
    _expect_error(ValueError, "input must be one of", lambda: call(input="bogus" if last else "replicated"))
    # the group is still in step: a good call goes through
    loss = call()
    want = _single(hidden, weight, None, pos_index=pos_index)
    assert abs(loss.item() - want.item()) <= 1e-5 * (1 + abs(want.item()))


def _check_empty_shard(rank, world):
    """num_labels < world: the last rank holds no labels (a [0, D] shard), in both input modes, with
    dense targets and with pos_index; the loss and gradients are still the single-process op's."""
    from fastnotes.distributed import LabelParallelMultilabelCE, label_parallel_multilabel_ce, shard_of
    hidden, weight, bias, pos_index, dense = _case(30 + world, torch.float64)
    labels = world - 1
    weight, bias, dense = weight[:labels], bias[:labels], dense[:, :labels]
    pos_index = torch.where(pos_index < labels, pos_index, -1)
    lo, size = shard_of(labels, rank, world)
    assert size == (0 if rank == world - 1 else 1)
    counts, starts = _split_rows(world)
    mine = slice(starts[rank], starts[rank] + counts[rank])
    for mode in ("replicated", "data_parallel"):
        rows = slice(None) if mode == "replicated" else mine
        for kind in ("sparse", "dense"):
            full = dict(pos_index=pos_index) if kind == "sparse" else dict(targets=dense)
            want = _grads(_single, hidden, weight, bias, None, **full)
            local = dict(pos_index=pos_index[rows]) if kind == "sparse" else dict(targets=dense[:, lo:lo + size])

            def head(h, w, b, **kwargs):
                return label_parallel_multilabel_ce(h, w[lo:lo + size], bias=b[lo:lo + size], label_offset=lo,
                                                    num_labels=labels, input=mode, **kwargs)
            got = _grads(head, hidden[rows], weight, bias, None, **local)
            scale = world if mode == "data_parallel" else 1  # Partial FC's convention for dL/dhidden
            torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(got[1], want[1][rows] * scale, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(got[2][lo:lo + size], want[2][lo:lo + size], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(got[3][lo:lo + size], want[3][lo:lo + size], rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="bias must be"):
        LabelParallelMultilabelCE.from_full(weight, torch.zeros(labels + 3, dtype=weight.dtype))
    with pytest.raises(ValueError, match="num_labels must be a positive int"):
        LabelParallelMultilabelCE(D, 0)


def _check_all(rank, world):
    for dtype in (torch.float64, torch.float32):
        for kind in ("sparse", "dense"):
            for reduction in ("mean", "sum", "none"):
                _check_against_single(rank, world, dtype, "replicated", kind, reduction)
            for reduction in ("mean", "sum"):
                _check_against_single(rank, world, dtype, "data_parallel", kind, reduction)
    # bfloat16 hidden and weight: the GEMMs in bfloat16, the epilogue and the combine in float32 / float64
    _check_against_single(rank, world, torch.bfloat16, "replicated", "sparse", "mean")
    _check_against_single(rank, world, torch.bfloat16, "data_parallel", "dense", "sum")
    if _dispatch.availability("triton", "cpu") is None:  # the Triton kernels under TRITON_INTERPRET=1
        import fastnotes
        with fastnotes.use_backend("triton"):
            _check_against_single(rank, world, torch.float32, "replicated", "sparse", "none")
            _check_against_single(rank, world, torch.float32, "data_parallel", "dense", "mean")
    _check_module(rank, world)
    _check_second_backward(rank, world)
    _check_topk(rank, world)
    _check_bad_input(rank, world)
    _check_empty_shard(rank, world)


@pytest.mark.parametrize("world", [2, 3])
def test_label_parallel_head(world, tmp_path):
    _spawn(world, _check_all, tmp_path)


@pytest.mark.parametrize("backend", [b for b in available_backends("cpu") if b != "reference"])
@pytest.mark.parametrize("kind", ["sparse", "soft"])
def test_chunk_launcher_takes_given_lse(backend, kind):
    # the launcher's lse= (what the head hands it after combining the shards): the gradient uses
    # the given (LA, LB), not the chunk's own; float64 formula g (exp(b - LB) - exp(a - LA))
    from fastnotes import _registry
    gen = torch.Generator().manual_seed(1)
    rows, cols = 5, 37
    logits = torch.randn(rows, cols, generator=gen) * 3
    pos_index = torch.stack([torch.randperm(cols, generator=gen)[:3] for _ in range(rows)])
    pos_index[1] = -1
    targets = torch.zeros(rows, cols).scatter_(1, pos_index.clamp(min=0), 1.0)
    targets[1] = 0
    if kind == "soft":
        soft = torch.rand(rows, cols, generator=gen)
        targets = torch.where(torch.rand(rows, cols, generator=gen) < 0.5, targets, soft)
    dense, index = (targets, None) if kind == "soft" else (None, pos_index)
    kernels = _registry.ZLPR.kernels(backend)
    scale = torch.rand(rows, generator=gen) + 0.5
    given = torch.rand(rows, 2, generator=gen) * 4 + 1
    work = logits.clone()
    loss, lse, n_bad = kernels.chunk_loss_and_grad(work, dense, index, scale, True, lse=given)
    s, t = logits.double(), targets.double()
    a = torch.where(t > 0, -s + t.log(), -math.inf)
    b = torch.where(t < 1, s + (1 - t).log(), -math.inf)
    want = scale.double()[:, None] * ((b - given.double()[:, 1:]).exp() - (a - given.double()[:, :1]).exp())
    assert (work.double() - want).abs().max().item() <= 1e-5 * (1 + want.abs().max().item())
    assert torch.allclose(lse.double(), given.double()) and torch.allclose(loss.double(), given.double().sum(1))
    assert float(n_bad) == 0
    # without lse, the chunk's own: the same as handing it back its own lse
    own = logits.clone()
    _, own_lse, _ = kernels.chunk_loss_and_grad(own, dense, index, scale, True)
    again = logits.clone()
    kernels.chunk_loss_and_grad(again, dense, index, scale, True, lse=own_lse)
    assert torch.allclose(again, own, rtol=1e-6, atol=1e-7)
