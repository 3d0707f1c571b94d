"""Hub-prior latent selection (docs/hubness.md; Liang et al., ICML 2022; Su, kexue.fm 9147):
draw a pool of latents, count each one's k-occurrence within the pool, keep the hubs."""
import numpy as np
import torch

from .. import _distributed
from .knn import k_occurrence


def _check(n, k, threshold, pool_size, max_pools, seed):
    for name, value, low in (("n", n, 1), ("k", k, 1), ("pool_size", pool_size, 2), ("max_pools", max_pools, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"hub_sample: {name} must be an int >= {low}, got {value!r}")
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool):
        raise TypeError(f"hub_sample: threshold must be a number, got {threshold!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError(f"hub_sample: seed must be a non-negative int or None, got {seed!r}")


def rank_seed(seed, rank):
    """The seed of torch's generators for the draws of group rank `rank` (rank 0 without a group):
    independent streams per rank, the same on every run."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1, np.uint64)[0] >> 1)


def _draw(sample_fn, pool_size, k, threshold, strict, include_self, feature_fn, metric):
    """One pool's kept latents."""
    latents = sample_fn(pool_size)
    if not isinstance(latents, torch.Tensor) or latents.dim() < 2 or latents.shape[0] != pool_size:
        raise ValueError(f"hub_sample: sample_fn({pool_size}) must return a tensor with {pool_size} rows, got "
                         f"{getattr(latents, 'shape', type(latents).__name__)}")
    features = latents if feature_fn is None else feature_fn(latents)
    counts = k_occurrence(features.reshape(pool_size, -1), k, metric=metric, exclude_self=not include_self)
    keep = counts > threshold if strict else counts >= threshold
    return latents[keep.to(latents.device)]


def hub_sample(sample_fn, n, *, k=5, threshold=50, pool_size=10000, strict=False, include_self=False,
               feature_fn=None, metric="sqeuclidean", max_pools=1000, seed=None, group=None):
    """n latents whose k-occurrence within their pool passes the threshold.

    Pools are drawn one at a time with sample_fn(pool_size) (e.g. `lambda m: torch.randn(m, 512)`);
    N_k is counted within each pool, on feature_fn(latents) when given (the Colab counts in StyleGAN's
    W space: `feature_fn=lambda z: G.mapping(z, None)[:, 0]`), else on the latents flattened per row.
    A latent is kept when N_k >= threshold (N_k > threshold with strict=True). Hubness is relative to
    the pool: keep pool_size fixed (10000 in both sources). Conventions:
        Su's blog code: k=5, threshold=50, strict=True (self excluded);
        the official Colab: k=5, threshold=50, include_self=True (self counted as one of the k).
    With include_self the point competes for its own list at distance 0 (exact duplicates aside,
    N_k with self = 1 + N_(k-1) without). At d = 512, k = 5 about 1.6-1.9% of Gaussian latents pass.

    seed: an int seeds torch's default generators (CPU and CUDA) for the draws, inside
    torch.random.fork_rng (the caller's generator state is restored afterwards): a sample_fn drawing
    from them (torch.randn) gives the same latents on every run.

    group: a torch.distributed ProcessGroup: every rank draws its own pools (seed= required, the same
    int on every rank; rank r's draws are seeded by rank_seed(seed, r), so the pools are independent),
    and after each round of one pool per rank the ranks count the hubs found; once the group has n,
    the kept latents are all-gathered and every rank returns the same n, in (round, rank, draw) order.
    max_pools is per rank. Arguments are agreed before the first draw; a bad sample_fn output on one
    rank raises the same error on every rank.

    Returns the first n kept latents in draw order, [n, ...]. Raises RuntimeError after max_pools
    pools without n hubs.
    """
    if group is not None:
        return _hub_sample_group(sample_fn, n, k, threshold, pool_size, strict, include_self, feature_fn, metric,
                                 max_pools, seed, group)
    _check(n, k, threshold, pool_size, max_pools, seed)
    kept, found = [], 0
    with torch.random.fork_rng(enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(rank_seed(seed, 0))
        for _ in range(max_pools):
            chosen = _draw(sample_fn, pool_size, k, threshold, strict, include_self, feature_fn, metric)
            kept.append(chosen)
            found += chosen.shape[0]
            if found >= n:
                return torch.cat(kept)[:n]
    raise RuntimeError(f"hub_sample: only {found} of {n} latents passed N_{k} {'>' if strict else '>='} {threshold} "
                       f"in {max_pools} pools of {pool_size}")


def _hub_sample_group(sample_fn, n, k, threshold, pool_size, strict, include_self, feature_fn, metric, max_pools,
                      seed, group):
    op = "hub_sample"
    rank, world = _distributed.check_group(op, group)
    options = (n, k, threshold, pool_size, strict, include_self, metric, max_pools, seed)
    error = None
    try:
        _check(n, k, threshold, pool_size, max_pools, seed)
        if seed is None:
            raise ValueError("hub_sample: group= needs seed= (an int, the same on every rank): each rank's "
                             "pools are seeded from it and its rank")
    except (ValueError, TypeError) as caught:
        error = caught
    agreed = _distributed.gather_checked(op, group, error, options)
    names = ("n", "k", "threshold", "pool_size", "strict", "include_self", "metric", "max_pools", "seed")
    for position, name in enumerate(names):
        values = [a[position] for a in agreed]
        if any(v != values[0] for v in values):
            raise ValueError(f"hub_sample: {name} differs between the ranks of the group: {values}")

    kept, rounds, found = [], [], 0  # rounds: per round, every rank's number of kept latents
    with torch.random.fork_rng():
        torch.manual_seed(rank_seed(seed, rank))
        for _ in range(max_pools):
            error, chosen = None, None
            try:
                chosen = _draw(sample_fn, pool_size, k, threshold, strict, include_self, feature_fn, metric)
            except Exception as caught:  # noqa: BLE001 - the other ranks must raise too, not hang
                error = caught
            facts = None if chosen is None else (chosen.shape[0], tuple(chosen.shape[1:]), str(chosen.dtype))
            facts = _distributed.gather_checked(op, group, error, facts)
            if any(f[1:] != facts[0][1:] for f in facts):
                raise ValueError(f"hub_sample: sample_fn returns latents of different shapes or dtypes on the ranks "
                                 f"of the group: {[f[1:] for f in facts]}")
            kept.append(chosen)
            rounds.append([f[0] for f in facts])
            found += sum(rounds[-1])
            if found >= n:
                return _gather_kept(torch.cat(kept), rounds, group, world, n)
    raise RuntimeError(f"hub_sample: only {found} of {n} latents passed N_{k} {'>' if strict else '>='} {threshold} "
                       f"in {max_pools} pools of {pool_size} on each of {world} ranks")


def _gather_kept(mine, rounds, group, world, n):
    """Every rank's kept latents (padded to the longest, all-gathered), the first n in (round, rank) order."""
    totals = [sum(r[rank] for r in rounds) for rank in range(world)]
    padded = mine.new_zeros((max(totals),) + tuple(mine.shape[1:]))
    padded[:mine.shape[0]] = mine
    parts = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded, group=group)
    ordered, taken = [], [0] * world
    for counts in rounds:
        for rank, count in enumerate(counts):
            ordered.append(parts[rank][taken[rank]:taken[rank] + count])
            taken[rank] += count
    return torch.cat(ordered)[:n]
