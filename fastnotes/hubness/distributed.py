"""Exact k-NN and k-occurrence over a torch.distributed group (docs/hubness.md, "Many processes"):
every rank holds a contiguous row shard of the queries (and of the reference set), the reference
shards travel around the ring, and each rank ends with the exact lists of its own queries.

The pipeline is the single-process one (_exact.py) with the reference cut into shards:
1. agree: every rank validates its shard, then one all_gather_object (_distributed.gather_checked)
   brings every rank the shapes, dtypes, options and maxima of all shards, so a bad shard or a
   disagreement raises the same error everywhere before any other collective. Global row indices
   are the shard's offset (ranks in group order) plus the local index.
2. centre: mu is the global reference mean (column sums all-gathered and added in rank order, so
   every rank gets the same bits), rounded as in _exact.round_centre after an all-reduce MAX of the
   column spreads; the largest centred reference norm (for the certification bound) is all-reduced too.
3. ring pass (`ring`): a rank searches its own shard, then the others as they arrive from rank - 1
   in chunks of `ref_rows` rows (shard rank - 1, then rank - 2, ...), forwarding each to rank + 1;
   the isend / irecv of the next chunk are posted before the last one is searched, so the transfer
   overlaps the distance tiles. Each chunk is centred on arrival (the same mu everywhere: the same v
   as its owner would compute), the backend's `candidates` give its best (v, index), a running
   per-row list keeps the best k + MARGIN by (v, global index), and the float64 distances of the
   candidates that entered it are computed directly right then, while their vectors are in memory
   (_exact.direct_distances), and carried in the list.
   Self-exclusion is by global index: on its own shard a rank searches one candidate more and drops
   its query's own row.
4. refine: as _exact.refine, from the carried distances: the k best by (distance rounded to the
   output dtype, global index); cosine's zero references (all at distance 1) are the first k + 1 zero
   rows of the whole set, agreed in step 1. A row whose candidates the bound cannot certify is
   searched again with float64 GEMMs in a second ring pass (only when some rank has such a row:
   an all-reduce of their count decides), with the direct distances of each chunk's best taken as
   it passes.
So every rank's lists are those the single-process op gives for the same rows of the concatenated
data: the exact k nearest under (rounded distance, index), up to near-ties within float64 rounding.

Memory per rank: its shards, the centred copy of its queries, two chunks in flight (plus, for P > 2,
the chunks of one peer shard kept until they are forwarded) and O(n_local (k + MARGIN)); k_occurrence
adds the counts ([m] int64, or the shard's [m_local] with counts="shard" after the reduction).
"""
import numpy as np
import torch

from .. import _dispatch, _distributed, _registry
from . import _exact, stream

_CHUNK_BYTES = 1 << 22  # default ring transfer: 4 MiB of rows (what is in flight per rank stays small)
_QUERY_BLOCK = 4096  # query rows per kernel call and merge
COUNTS = ("all", "shard")


def _local_rows(op, name, t):
    """A [n, d] shard as a tensor: tensors as they are (n = 0 allowed), a memmap / .npy path mapped."""
    if stream.is_streamed(t):
        return stream.open_rows(op, name, t)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, a numpy.memmap or a path to a .npy file, "
                        f"got {type(t).__name__}")
    if not t.is_floating_point() or t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"{op}: {name} must be a float16/bfloat16/float32/float64 tensor, got {t.dtype}")
    if t.dim() != 2 or t.shape[1] == 0:
        raise ValueError(f"{op}: {name} must be [n, d] with d >= 1 (n = 0 allowed on a rank), got shape "
                         f"{tuple(t.shape)}")
    if t.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{op}: {name} requires grad; with group= the op computes no gradients (detach it, "
                         "or recompute the distances of the returned pairs)")
    return t.detach().contiguous()


def _largest(op, name, t):
    """max |value| of a shard (0 when empty); raises on NaN / infinity."""
    largest = 0.0
    for rows in t.split(8192) if t.numel() else ():
        value = float(rows.abs().max())
        if not value < float("inf"):  # NaN too
            raise ValueError(f"{op}: {name} contains NaN or infinite values")
        largest = max(largest, value)
    return largest


def _zero_rows(t, limit):
    """(how many rows of t are zero, the local indices of the first `limit` of them)."""
    zero = torch.cat([torch.linalg.vector_norm(rows.double(), dim=1) == 0 for rows in t.split(8192)]) \
        if t.shape[0] else torch.zeros(0, dtype=torch.bool, device=t.device)
    where = torch.nonzero(zero)[:, 0]
    return int(zero.sum()), where[:limit].tolist()


def _facts(op, x, reference, k, metric, exclude_self, ref_rows):
    """What this rank brings to the agreement: its tensors and a dict of facts (raises on bad input)."""
    from .knn import check_options

    check_options(op, k, metric, exclude_self)
    x = _local_rows(op, "x", x)
    same = reference is None or reference is x
    ref = x if same else _local_rows(op, "reference", reference)
    if not same:
        if ref.dtype != x.dtype:
            raise TypeError(f"{op}: reference has dtype {ref.dtype} but x has {x.dtype}")
        if ref.device != x.device:
            raise ValueError(f"{op}: reference is on {ref.device} but x is on {x.device}")
    if ref_rows is not None and (isinstance(ref_rows, bool) or not isinstance(ref_rows, int) or ref_rows < 1):
        raise ValueError(f"{op}: ref_rows must be a positive int, got {ref_rows!r}")
    x_max = _largest(op, "x", x)
    ref_max = x_max if same else _largest(op, "reference", ref)
    zeros = _zero_rows(ref, k + 1) if metric == "cosine" else (0, [])
    from .knn import _why_not

    probe = x[:1] if x.shape[0] else x.new_zeros(1, x.shape[1])
    # k + 1: on its own shard a rank searches one candidate more
    backend = _dispatch.select(op, x.device.type, lambda b: _why_not(b, probe, k + 1))
    if backend == "reference":
        raise _dispatch.BackendUnsupportedError(
            f"{op}: group= runs the fused kernels (numba, triton or cuda); the float64 module oracle needs "
            "the whole set in one process")
    facts = {"n": x.shape[0], "m": ref.shape[0], "d": x.shape[1], "dtype": str(x.dtype), "device": x.device.type,
             "reference": not same, "k": k, "metric": metric, "exclude_self": exclude_self, "backend": backend,
             "ref_rows": ref_rows, "x_max": x_max, "ref_max": ref_max, "zeros": zeros}
    return x, ref, facts


def _agree(op, facts):
    """Raise the same error on every rank unless the ranks' shards and options fit together."""
    for key, what in (("d", "the number of columns d"), ("dtype", "the dtype"), ("device", "the device type"),
                      ("reference", "whether reference= is given"), ("k", "k"), ("metric", "metric"),
                      ("exclude_self", "exclude_self"), ("backend", "the selected backend"),
                      ("ref_rows", "ref_rows")):
        values = [f[key] for f in facts]
        if any(v != values[0] for v in values):
            by_rank = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
            raise ValueError(f"{op}: {what} differs between the ranks of the group ({by_rank})")
    first = facts[0]
    n, m = sum(f["n"] for f in facts), sum(f["m"] for f in facts)
    if n == 0:
        raise ValueError(f"{op}: x has no rows on any rank of the group")
    same = not first["reference"]
    exclude = first["exclude_self"] and same
    available = m - 1 if exclude else m
    if not 1 <= first["k"] < available:
        what = f"{m} points with self excluded" if exclude else f"a reference set of {m} points"
        raise ValueError(f"{op}: k must satisfy 1 <= k < {available} for {what} (all ranks), got k = {first['k']}")


def _send_to(group, rank, world):
    return torch.distributed.get_global_rank(group, (rank + 1) % world)


def _recv_from(group, rank, world):
    return torch.distributed.get_global_rank(group, (rank - 1) % world)


def ring(group, rank, world, own, sizes, chunk_rows, visit):
    """Pass every rank's reference shard through `visit(src, start, rows)` on every rank (rows
    [start, start + len(rows)) of shard src), its own first, in one piece (it is in memory: a visit
    that needs bounded pieces cuts it). Then world - 1 steps of the same grid of
    chunks on every rank: at step s, chunk j of shard (rank - s) arrives from rank - 1 while chunk j of
    shard (rank - s + 1) (its own at step 1, else the one that arrived at step s - 1) leaves for
    rank + 1, and the chunk that arrived in the previous iteration is visited meanwhile. Each isend
    meets its irecv in the same iteration, so no rank waits on another's progress beyond that.
    Memory: two chunks in flight, plus for world > 2 the chunks kept to be forwarded at the next step
    (at most one shard)."""
    dist = torch.distributed
    d = own.shape[1]
    chunks = max(1, max(-(-m // chunk_rows) for m in sizes))

    def rows_of(src, j):
        return max(0, min(chunk_rows, sizes[src] - j * chunk_rows))

    to_next, from_previous = _send_to(group, rank, world), _recv_from(group, rank, world)
    keep = {}  # (shard, chunk) arrived at the last step, to be forwarded at this one
    arrived = None  # (shard, start, rows): arrived in the previous iteration, not yet visited
    grid = [(step, j) for step in range(1, world) for j in range(chunks)]
    for t, (step, j) in enumerate(grid):
        src_in, src_out = (rank - step) % world, (rank - step + 1) % world
        out = own[j * chunk_rows:(j + 1) * chunk_rows] if step == 1 else keep.pop((src_out, j))
        incoming = own.new_empty((rows_of(src_in, j), d))
        transfers = []
        if out.shape[0]:
            transfers.append(dist.isend(out, to_next, group=group))
        if incoming.shape[0]:
            transfers.append(dist.irecv(incoming, from_previous, group=group))
        if t == 0:  # the own shard, while the first chunk travels
            visit(rank, 0, own)
        elif arrived[2].shape[0]:
            visit(*arrived)
        for transfer in transfers:
            transfer.wait()
        del out
        if step < world - 1:
            keep[(src_in, j)] = incoming
        arrived = (src_in, j * chunk_rows, incoming)
    if not grid:  # one rank
        visit(rank, 0, own)
    elif arrived[2].shape[0]:
        visit(*arrived)


def _merge(width, values, indices, *extra):
    """Each row's best `width` entries by (values, indices) (NaN values as +inf), with `extra`
    tensors of the same shape carried along."""
    values = torch.nan_to_num(values, nan=float("inf"))
    by_index = torch.sort(indices, dim=1, stable=True).indices
    by_value = torch.sort(values.gather(1, by_index), dim=1, stable=True).indices[:, :width]
    order = by_index.gather(1, by_value)
    return [t.gather(1, order) for t in (values, indices, *extra)]


class _Sharded:
    """One call's state on this rank (module docstring)."""

    def __init__(self, op, x, ref, facts, rank, group):
        self.op, self.x, self.group, self.rank, self.world = op, x, group, rank, len(facts)
        first = facts[rank]
        self.same = not first["reference"]
        self.ref = x if self.same else ref
        self.k, self.metric = first["k"], first["metric"]
        self.exclude_self = first["exclude_self"] and self.same
        self.n_sizes = [f["n"] for f in facts]
        self.m_sizes = [f["m"] for f in facts]
        self.q_offset = sum(self.n_sizes[:rank])
        self.r_offsets = np.cumsum([0] + self.m_sizes).tolist()
        self.m = self.r_offsets[-1]
        self.kernels = _registry.HUBNESS.kernels(first["backend"])
        wide = x.dtype == torch.float64 and first["backend"] == "numba"
        self.compute_dtype = self.out_dtype = torch.float64 if wide else torch.float32
        self.scale = -1.0 if self.metric == "ip" else -2.0
        self.paired = getattr(self.kernels, "paired_distances", None)
        self.chunk_rows = first["ref_rows"] or max(1, _CHUNK_BYTES // (x.shape[1] * x.element_size()))
        self.zero_count = sum(f["zeros"][0] for f in facts)
        # cosine: the first k + 1 zero references of the whole set (all at distance 1 from everything)
        zero_first = [self.r_offsets[r] + i for r, f in enumerate(facts) for i in f["zeros"][1]]
        self.zero_first = torch.tensor(sorted(zero_first)[:self.k + 1], dtype=torch.int64, device=x.device)
        self.rows = torch.arange(x.shape[0], device=x.device)
        self.global_rows = self.rows + self.q_offset
        self.width = min(self.k + _exact.MARGIN, self.m)

    def _all_gather(self, t):
        parts = [torch.empty_like(t) for _ in range(self.world)]
        torch.distributed.all_gather(parts, t, group=self.group)
        return parts

    def _all_max(self, t):
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return t

    def centre(self):
        """mu, the centred queries and the certification bound (module docstring, step 2)."""
        metric, ref = self.metric, self.ref
        total = None
        for part in self._all_gather(_exact.column_sum(ref, metric)):  # in rank order: the same bits everywhere
            total = part if total is None else total + part
        mean = total / self.m
        self.mu = _exact.round_centre(mean, self._all_max(_exact.column_spread(ref, metric, mean)))
        self.xc, x_norms = _exact._shifted(self.x, self.mu, metric, self.compute_dtype)
        if self.same:
            self.own_add = self._add(self.x, x_norms, self.xc)
            r_norms, zero_r = x_norms, self._zero(self.x)
        else:
            r_norms = torch.cat([_exact._shifted(rows, self.mu, metric, self.compute_dtype)[1]
                                 for rows in ref.split(_exact._chunk(ref.shape[1]))]) if ref.shape[0] else x_norms[:0]
            zero_r = self._zero(ref)
        if zero_r is not None:
            r_norms = torch.where(zero_r, 0.0, r_norms)
        big = r_norms.max() if r_norms.numel() else r_norms.new_zeros(())
        big = self._all_max(big.reshape(1))[0]
        self.zero_x = self._zero(self.x)
        self.bound = _exact.certification_bound(metric, self.mu, self.x.shape[1], x_norms, big, self.compute_dtype,
                                                self.out_dtype)

    def _zero(self, t):
        if self.metric != "cosine":
            return None
        return torch.linalg.vector_norm(t.double(), dim=1) == 0

    def _add(self, raw, norms, centred):
        """v = add + scale <x~, y~> for reference rows raw (centred, with centred norms): as _exact.prepare."""
        if self.metric == "ip":
            add = -(centred.double() @ self.mu)
        else:
            add = norms ** 2
            if self.metric == "cosine":
                add = torch.where(self._zero(raw), float("inf"), add)
        return add.to(self.compute_dtype)

    def _ring(self, visit):
        ring(self.group, self.rank, self.world, self.ref, self.m_sizes, self.chunk_rows, visit)

    def candidates(self):
        """Ring pass 1: per query row the best `width` references by (v, global index), with their
        rounded direct distances and whether they are invalid (empty slot or cosine zero reference).
        Unfilled slots hold (+inf, m), as the kernels' empty slots do."""
        n, width, device = self.x.shape[0], self.width, self.x.device
        best = (torch.full((n, width), float("inf"), dtype=self.compute_dtype, device=device),
                torch.full((n, width), self.m, dtype=torch.int64, device=device),
                torch.full((n, width), float("inf"), dtype=torch.float64, device=device),
                torch.ones((n, width), dtype=torch.bool, device=device))

        def visit(src, start, raw):
            if src == self.rank and not self.same:  # its own reference shard: centred chunk by chunk
                for s in range(0, raw.shape[0], self.chunk_rows):
                    search(src, start + s, raw[s:s + self.chunk_rows])
            else:  # a peer's chunk, or one set's own shard (its centred rows are self.xc: no copy)
                search(src, start, raw)

        def search(src, start, raw):
            c, first = raw.shape[0], self.r_offsets[src] + start
            if n == 0:
                return
            if self.same and src == self.rank:
                rc, add = self.xc[start:start + c], self.own_add[start:start + c]
                zero = None if self.zero_x is None else self.zero_x[start:start + c]
            else:
                rc, norms = _exact._shifted(raw, self.mu, self.metric, self.compute_dtype)
                add = self._add(raw, norms, rc)
                zero = self._zero(raw)
            own = self.exclude_self and src == self.rank
            for lo in range(0, n, _QUERY_BLOCK):  # query blocks: the merge's temporaries stay O(block width)
                rows = self.rows[lo:lo + _QUERY_BLOCK]
                v, i = self.kernels.candidates(self.xc[lo:lo + _QUERY_BLOCK], rc, add, self.scale,
                                               width + 1 if own else width, False)
                empty = i >= c
                i = torch.where(empty, 0, i)
                g = torch.where(empty, self.m, i + first)
                if own:  # drop the query's own row, or the last candidate when it is not among them
                    mine = g == self.global_rows[rows][:, None]
                    mine[:, -1] |= ~mine.any(1)
                    keep = ~mine
                    v, i, g, empty = (t[keep].view(len(rows), -1) for t in (v, i, g, empty))
                invalid = empty | zero[i] if zero is not None else empty
                # merge first, then compute the direct distances only of the chunk's candidates that
                # entered a list (told by their global indices; after the first chunks, few)
                fresh = (v.to(self.compute_dtype), g, i.new_zeros(i.shape, dtype=torch.float64), invalid)
                merged = _merge(width, *(torch.cat([b[rows], t], 1) for b, t in zip(best, fresh)))
                entered = (merged[1] >= first) & (merged[1] < first + c)
                exact = _exact.direct_distances(self.x, raw, rows[torch.nonzero(entered)[:, 0]],
                                                merged[1][entered][:, None] - first, self.metric, self.paired)
                merged[2][entered] = _exact.rounded(exact[:, 0], self.out_dtype)
                for b, new in zip(best, merged):
                    b[rows] = new

        self._ring(visit)
        return best

    def refine(self, values, indices, exact, invalid):
        """(distances [n, k] float64, indices [n, k]): step 4 of the module docstring."""
        k, m, n = self.k, self.m, self.x.shape[0]
        dist = torch.empty((n, k), dtype=torch.float64, device=exact.device)
        chosen = torch.empty((n, k), dtype=torch.int64, device=exact.device)
        for lo in range(0, n, _QUERY_BLOCK):
            rows = slice(lo, lo + _QUERY_BLOCK)
            e, i, bad = exact[rows], indices[rows], invalid[rows]
            if self.zero_count:  # cosine's zero references, all at distance 1
                extra = self.zero_first.expand(e.shape[0], -1)
                e = torch.cat([e, torch.ones(extra.shape, dtype=torch.float64, device=extra.device)], 1)
                i = torch.cat([i, extra], 1)
                bad = torch.cat([bad, (extra == self.global_rows[rows][:, None]) & self.exclude_self], 1)
            dist[rows], chosen[rows] = _exact._select(torch.where(bad, float("inf"), e), torch.where(bad, m, i), k)

        reachable = m - (1 if self.exclude_self else 0) - self.zero_count
        doubtful = torch.zeros(n, dtype=torch.bool, device=dist.device)
        if self.width < reachable and n:
            v = torch.nan_to_num(values.double(), nan=float("inf"))
            doubtful = ~(v[:, -1] > v[:, k - 1] + self.bound)
            if self.zero_x is not None:
                doubtful &= ~self.zero_x
        count = torch.tensor([int(doubtful.sum())], device=dist.device)
        torch.distributed.all_reduce(count, group=self.group)
        if int(count[0]):  # every rank passes its shards on, also without doubtful rows of its own
            redo = torch.nonzero(doubtful)[:, 0]
            found = self._full_search(redo)
            if len(redo):
                dist[redo], chosen[redo] = found
        if self.zero_x is not None and bool(self.zero_x.any()):  # every distance is 1: the first k indices
            zero = torch.nonzero(self.zero_x)[:, 0]
            first = torch.arange(k + 1, device=zero.device).expand(len(zero), -1)
            own = (first == self.global_rows[zero][:, None]) & self.exclude_self
            _, chosen[zero] = _exact._select(torch.where(own, float("inf"), 1.0), torch.where(own, m, first), k)
            dist[zero] = 1.0
        return dist, chosen

    def _full_search(self, redo):
        """Ring pass 2 for the rows `redo`: the k best of every reference by float64 GEMM distance
        (_exact.search_tile), then by their direct distances (as _exact.refine's fallback)."""
        k, m = self.k, self.m
        x64 = _exact._rows64(self.x[redo], self.metric)
        zero_x = self.zero_x[redo] if self.zero_x is not None else None
        self_index = self.global_rows[redo] if self.exclude_self else None
        device = x64.device
        best = [torch.full((len(redo), 0), float("inf"), dtype=torch.float64, device=device),
                torch.zeros((len(redo), 0), dtype=torch.int64, device=device),
                torch.zeros((len(redo), 0), dtype=torch.float64, device=device)]
        cols = _exact.search_columns(len(redo), self.x.shape[1])

        def visit(src, start, raw):
            if not len(redo):
                return
            for s in range(0, raw.shape[0], cols):
                tile = raw[s:s + cols]
                first = self.r_offsets[src] + start + s
                dist, index = _exact.search_tile(x64, tile, first, self.metric, self.mu, self.out_dtype, zero_x,
                                                 self_index, m)
                dist, index = _exact._select(dist, index, min(k, tile.shape[0]))
                own = index >= m  # a query's own row (only when the tile is shorter than k + 1)
                local = torch.where(own, 0, index - first)
                exact = _exact.rounded(_exact.direct_distances(self.x, tile, redo, local, self.metric, self.paired),
                                       self.out_dtype)
                exact = torch.where(own, float("inf"), exact)
                best[:] = _merge(k, torch.cat([best[0], dist], 1), torch.cat([best[1], index], 1),
                                 torch.cat([best[2], exact], 1))

        self._ring(visit)
        return _exact._select(best[2], best[1], k)


def run(op, x, k, reference, metric, exclude_self, group, *, want_lists, counts="all", ref_rows=None, unused=()):
    """knn / k_occurrence with group=: (distances [n_local, k], global indices [n_local, k]) when
    want_lists, else the counts (all ranks' [m] with counts="all", the shard's [m_local] with "shard").
    unused: {name: value} of the keywords that do not apply with group= (an error unless None)."""
    rank, _ = _distributed.check_group(op, group)
    error, tensors, facts = None, None, None
    try:
        for name, value in dict(unused).items():
            if value is not None:
                raise TypeError(f"{op}: {name} does not apply with group= (ref_rows sets the rows per ring "
                                f"transfer), got {name}={value!r}")
        if counts not in COUNTS:
            raise ValueError(f"{op}: counts must be one of {COUNTS}, got {counts!r}")
        *tensors, facts = _facts(op, x, reference, k, metric, exclude_self, ref_rows)
    except Exception as caught:  # noqa: BLE001 - every rank must learn of it, or the others hang
        error = caught
    facts = _distributed.gather_checked(op, group, error, facts)
    _agree(op, facts)
    from .knn import _check_distance_range

    _check_distance_range(op, metric, facts[0]["d"], max(f["x_max"] for f in facts),
                          max(f["ref_max"] for f in facts), tensors[0].dtype)
    with torch.no_grad(), torch.autocast(tensors[0].device.type, enabled=False):
        state = _Sharded(op, *tensors, facts, rank, group)
        state.centre()
        dist, chosen = state.refine(*state.candidates())
    if want_lists:
        return dist.to(state.out_dtype), chosen
    total = torch.bincount(chosen.reshape(-1), minlength=state.m)
    if counts == "all":
        torch.distributed.all_reduce(total, group=group)
        return total
    # counts="shard": reduce-scatter the [m] counts back to the reference shards (padded to equal parts)
    widest = max(state.m_sizes)
    parts = [torch.zeros(widest, dtype=torch.int64, device=total.device) for _ in range(state.world)]
    for r, part in enumerate(parts):
        part[:state.m_sizes[r]] = total[state.r_offsets[r]:state.r_offsets[r + 1]]
    del total
    mine = torch.zeros(widest, dtype=torch.int64, device=parts[0].device)
    torch.distributed.reduce_scatter(mine, parts, group=group)
    return mine[:state.m_sizes[rank]]
