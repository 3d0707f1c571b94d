"""knn / k_occurrence / hub_sample with group= on torch.distributed with gloo (issue 14): W spawned
processes (world 2 and 3; uneven shards, one shorter than k, one empty) each pass their row shard and
get exactly what one process gives on the concatenated data; bad input raises the same error on
every rank (../shared/DESIGN.md, "Multiple devices"). One spawn per world size runs every check.
Also the CLI under torchrun."""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
from distributed_cases import spawn

from fastnotes import hubness
from fastnotes.hubness import distributed as sharded_module
from fastnotes.hubness.sampling import _draw, rank_seed

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

METRICS = ("sqeuclidean", "cosine", "ip")
K = 5
QUERY_SHARES = {2: [41, 29], 3: [3, 0, 67]}  # 70 rows; world 3: a shard shorter than k and an empty one
REFERENCE_SHARES = {2: [15, 25], 3: [0, 30, 10]}  # 40 reference rows
AGAINST_SHARES = {2: [41, 9], 3: [20, 25, 5]}  # 50 queries against them


def _gaussian(n, d, seed, dtype=torch.float32):
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
    x[4] = 0.0  # a zero row (cosine: distance 1 to everything)
    x[9] = x[2]  # a duplicate: distance-0 tie, still a neighbour of 2 with self excluded
    return x


def _datasets():
    g = torch.Generator().manual_seed(5)
    return {
        "gaussian": _gaussian(70, 6, 0),
        "float64": _gaussian(70, 6, 1, torch.float64),
        # far from the origin: the centring by the global mean matters
        "offset": 100 + 0.1 * torch.randn(70, 6, generator=g),
        # small integers: large groups of ties, rows the bound cannot certify (the second ring pass)
        "integer": torch.randint(0, 3, (70, 4), generator=g).float(),
    }


def _shard(t, shares, rank):
    lo = sum(shares[:rank])
    return t[lo:lo + shares[rank]]


def _check_equal_to_one_process(rank, world, group):
    shares = QUERY_SHARES[world]
    passes = []
    original = sharded_module._Sharded._full_search

    def counting(self, redo):
        passes.append(len(redo))
        return original(self, redo)

    sharded_module._Sharded._full_search = counting
    try:
        for name, x in _datasets().items():
            mine = _shard(x, shares, rank)
            for metric in METRICS:
                for exclude_self in (True, False) if name == "gaussian" else (True,):
                    want_d, want_i = hubness.knn(x, K, metric=metric, exclude_self=exclude_self)
                    # ref_rows 7: every shard crosses the ring in several chunks
                    got_d, got_i = hubness.knn(mine, K, metric=metric, exclude_self=exclude_self, group=group,
                                               ref_rows=7)
                    rows = _shard(torch.arange(len(x)), shares, rank)
                    assert got_i.shape == (len(mine), K) and got_d.dtype == want_d.dtype, (name, metric)
                    assert torch.equal(got_i, want_i[rows]), (name, metric, exclude_self)
                    assert torch.equal(got_d, want_d[rows]), (name, metric, exclude_self)
                    if exclude_self:  # by global index: a row never lists itself
                        assert not (got_i == rows[:, None]).any()
                counts = hubness.k_occurrence(x, K, metric=metric)
                got = hubness.k_occurrence(mine, K, metric=metric, group=group)
                assert torch.equal(got, counts) and int(got.sum()) == K * len(x), (name, metric)
                if name == "gaussian":
                    shard_counts = hubness.k_occurrence(mine, K, metric=metric, group=group, counts="shard",
                                                        ref_rows=11)
                    assert torch.equal(shard_counts, counts[rows]), (name, metric)
    finally:
        sharded_module._Sharded._full_search = original
    # integer data sent rows to the float64 search on some rank
    everyone = torch.tensor([sum(passes)])
    dist.all_reduce(everyone, group=group)
    assert int(everyone) > 0, "the second ring pass never ran"


def _check_reference_set(rank, world, group):
    x, ref = _gaussian(50, 5, 2), _gaussian(40, 5, 3)
    x_mine = _shard(x, AGAINST_SHARES[world], rank)
    ref_mine = _shard(ref, REFERENCE_SHARES[world], rank)
    lo = sum(AGAINST_SHARES[world][:rank])
    for metric in METRICS:
        want_d, want_i = hubness.knn(x, K, reference=ref, metric=metric)
        got_d, got_i = hubness.knn(x_mine, K, reference=ref_mine, metric=metric, group=group, ref_rows=6)
        assert torch.equal(got_i, want_i[lo:lo + len(x_mine)]) and torch.equal(got_d, want_d[lo:lo + len(x_mine)])
        counts = hubness.k_occurrence(x, K, reference=ref, metric=metric)
        assert torch.equal(hubness.k_occurrence(x_mine, K, reference=ref_mine, metric=metric, group=group), counts)
        assert torch.equal(hubness.k_occurrence(x_mine, K, reference=ref_mine, metric=metric, group=group,
                                                counts="shard"), _shard(counts, REFERENCE_SHARES[world], rank))


def _check_memmap_shard(rank, world, group):
    x = _gaussian(70, 6, 4)
    shares = [35, 35] if world == 2 else [30, 20, 20]
    mine = _shard(x, shares, rank)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, f"shard{rank}.npy")
        np.save(path, mine.numpy())
        got_d, got_i = hubness.knn(path, K, group=group, ref_rows=8)
        mapped = np.load(path, mmap_mode="r")
        counts = hubness.k_occurrence(mapped, K, group=group)
        del mapped
    want_d, want_i = hubness.knn(x, K)
    lo = sum(shares[:rank])
    assert torch.equal(got_i, want_i[lo:lo + len(mine)]) and torch.equal(got_d, want_d[lo:lo + len(mine)])
    assert torch.equal(counts, hubness.k_occurrence(x, K))


def _raises_everywhere(kind, match, call):
    with pytest.raises(kind, match=match):
        call()


def _check_bad_input(rank, world, group):
    x = _gaussian(70, 6, 0)
    mine = _shard(x, QUERY_SHARES[world], rank)
    # k >= n - 1 for the whole set (every shard is smaller, so only the global check can say it)
    _raises_everywhere(ValueError, r"k must satisfy 1 <= k < 69 for 70 points with self excluded",
                       lambda: hubness.k_occurrence(mine, 69, group=group))
    # NaN on the last rank only: the same error, naming it, on every rank
    bad = mine.clone()
    if rank == world - 1:
        bad[0, 0] = float("nan")
    _raises_everywhere(ValueError, rf"x contains NaN or infinite values \(raised on rank {world - 1}",
                       lambda: hubness.knn(bad, K, group=group))
    # a different d on rank 1
    wide = torch.zeros(len(mine), 7) if rank == 1 else mine
    _raises_everywhere(ValueError, r"the number of columns d differs between the ranks of the group \(rank 0: 6, "
                                   r"rank 1: 7", lambda: hubness.k_occurrence(wide, K, group=group))
    # a list on rank 0
    _raises_everywhere(TypeError, r"x must be a tensor.*rank 0",
                       lambda: hubness.knn(mine.tolist() if rank == 0 else mine, K, group=group))
    _raises_everywhere(ValueError, r"k differs", lambda: hubness.knn(mine, K + rank, group=group))
    _raises_everywhere(TypeError, r"block_rows does not apply with group=",
                       lambda: hubness.k_occurrence(mine, K, group=group, block_rows=10))
    _raises_everywhere(ValueError, r"counts must be one of",
                       lambda: hubness.k_occurrence(mine, K, group=group, counts="local"))
    _raises_everywhere(ValueError, r"reference= is given",
                       lambda: hubness.knn(mine, K, reference=mine.clone() if rank == 0 else None, group=group))
    # the group still works after the errors
    assert torch.equal(hubness.k_occurrence(mine, K, group=group), hubness.k_occurrence(x, K))


def _sample(m):
    return torch.randn(m, 8)


def _check_hub_sample(rank, world, group):
    options = dict(k=5, threshold=12, pool_size=120, seed=7)
    got = hubness.hub_sample(_sample, 25, group=group, **options)
    # the same rounds by hand: rank r's pools from rank_seed(7, r), kept latents in (round, rank) order
    draws = []
    for r in range(world):
        with torch.random.fork_rng():
            torch.manual_seed(rank_seed(7, r))
            draws.append([_draw(_sample, 120, 5, 12, False, False, None, "sqeuclidean") for _ in range(30)])
    ordered, found = [], 0
    for pool in range(30):
        for r in range(world):
            ordered.append(draws[r][pool])
        found += sum(draws[r][pool].shape[0] for r in range(world))
        if found >= 25:
            break
    want = torch.cat(ordered)[:25]
    assert got.shape == (25, 8) and torch.equal(got, want)
    assert torch.equal(hubness.hub_sample(_sample, 25, group=group, **options), got)  # reproducible
    # world 1 would be the single process with the same seed: rank 0's stream
    with torch.random.fork_rng():
        torch.manual_seed(rank_seed(7, 0))
        first = _draw(_sample, 120, 5, 12, False, False, None, "sqeuclidean")
    assert torch.equal(hubness.hub_sample(_sample, 2, **options), first[:2])
    _raises_everywhere(ValueError, "needs seed=", lambda: hubness.hub_sample(_sample, 5, group=group, pool_size=50))
    _raises_everywhere(ValueError, "pool_size differs",
                       lambda: hubness.hub_sample(_sample, 5, group=group, pool_size=50 + rank, seed=1))
    _raises_everywhere(ValueError, r"must return a tensor with 50 rows.*rank 1",
                       lambda: hubness.hub_sample(lambda m: torch.randn(m - (rank == 1), 4), 5, group=group,
                                                  pool_size=50, seed=1))


def _check_all(rank, world):
    group = dist.new_group(list(range(world)))
    _check_equal_to_one_process(rank, world, group)
    _check_reference_set(rank, world, group)
    _check_memmap_shard(rank, world, group)
    _check_bad_input(rank, world, group)
    _check_hub_sample(rank, world, group)


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_equals_one_process(tmp_path, world):
    spawn(world, _check_all, tmp_path)


def test_torchrun_cli(tmp_path):
    x = _gaussian(150, 7, 6).numpy()
    path = tmp_path / "x.npy"
    np.save(path, x)
    out_json, out_npy = tmp_path / "stats.json", tmp_path / "counts.npy"
    # --standalone: a c10d rendezvous on a free port of localhost (no fixed port to clash)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "fastnotes", "hubness", str(path), "--k", "5", "--block-rows", "40",
                          "--out", str(out_json), "--out", str(out_npy)],
                         check=False, capture_output=True, text=True, timeout=150)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("sharded over 2 ranks") == 1  # rank 0 alone reports
    counts = hubness.k_occurrence(torch.from_numpy(x), 5)
    assert np.array_equal(np.load(out_npy), counts.numpy())
    stats = hubness.hubness_stats(counts, 5)
    assert json.loads(out_json.read_text())["stats"] == pytest.approx(stats, rel=0, abs=0)
