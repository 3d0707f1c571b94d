"""Hubness reduction (spec oracles H-G, H-H), hub-prior sampling (H-F), the CLI and the self-check."""
import subprocess
import sys

import numpy as np
import pytest
import torch

import fastnotes
from fastnotes import hubness
from fastnotes.reference import hubness as reference

# ---- reduction ------------------------------------------------------------------------------------

H_G = torch.tensor([[0, 0], [1, 0], [0, 1], [3, 0], [0, 4]], dtype=torch.float64)


def _all_others(points):
    """Euclidean lists of every other point, nearest first (the spec's full-matrix versions)."""
    n = points.shape[0]
    dist = reference.pairwise_distances(points, points).sqrt()
    _, indices = reference.knn(points, None, n - 1)  # sqeuclidean order = Euclidean order
    return dist.gather(1, indices), indices


def _as_matrix(secondary, indices):
    n = secondary.shape[0]
    full = torch.full((n, n), float("nan"), dtype=torch.float64)
    return full.scatter_(1, indices, secondary.double())


@pytest.mark.parametrize("method, kwargs, expected", [
    ("mutual_proximity", {}, {(0, 1): 0.311611, (0, 2): 0.26303, (0, 3): 0.829255, (0, 4): 0.953977,
                              (1, 2): 0.434997, (1, 3): 0.519007, (3, 4): 0.995092}),
    ("local_scaling", {"neighbors": 1}, {(0, 1): 0.632121, (1, 2): 0.864665, (1, 3): 0.864665, (0, 3): 0.988891,
                                         (2, 4): 0.950213}),
    ("nicdm", {"neighbors": 2}, {(0, 1): 0.91018, (1, 3): 1.151296, (2, 4): 1.459535}),
])
def test_reduction_spec_oracles(method, kwargs, expected):
    distances, indices = _all_others(H_G)
    secondary, new_indices = hubness.reduce_hubness(distances, indices, method, **kwargs)
    matrix = _as_matrix(secondary, new_indices)
    for (i, j), value in expected.items():
        assert matrix[i, j].item() == pytest.approx(value, abs=2e-6), (i, j)
        assert matrix[j, i].item() == pytest.approx(value, abs=2e-6), (j, i)  # all three are symmetric
    # rows come back sorted by (secondary, index), holding the same neighbours
    assert bool((secondary[:, 1:] >= secondary[:, :-1]).all())
    assert torch.equal(new_indices.sort(dim=1).values, indices.sort(dim=1).values)


def test_dissim_local_spec_oracle():
    """H-G DisSimLocal (k = 2, squared Euclidean), before any shift; the explicit cross-set arguments
    (reference_vectors + reference_indices) give the same values."""
    distances, indices = reference.knn(H_G, None, 4)
    secondary, new_indices = hubness.reduce_hubness(distances, indices, "dissim_local", neighbors=2, vectors=H_G)
    matrix = _as_matrix(secondary, new_indices)
    for (i, j), value in {(0, 1): -0.75, (1, 3): -3.5, (2, 4): -4.5, (3, 4): 6.5}.items():
        assert matrix[i, j].item() == pytest.approx(value, abs=1e-12)
        assert matrix[j, i].item() == pytest.approx(value, abs=1e-12)
    cross = hubness.reduce_hubness(distances, indices, "dissim_local", neighbors=2, vectors=H_G,
                                   reference_vectors=H_G.clone(), reference_indices=indices.clone())
    assert torch.equal(cross[0], secondary) and torch.equal(cross[1], new_indices)
    with pytest.raises(ValueError, match="needs vectors"):
        hubness.reduce_hubness(distances, indices, "dissim_local")
    with pytest.raises(ValueError, match="needs reference_indices"):
        hubness.reduce_hubness(distances[:3], indices[:3], "dissim_local", vectors=H_G[:3], reference_vectors=H_G)


def test_csls_spec_oracle():
    """H-H: cross-domain lists (sources -> targets) with the targets' own lists to the sources."""
    sources = torch.tensor([[1, 0], [0.6, 0.8], [0, 1]], dtype=torch.float64)
    targets = torch.tensor([[0.8, 0.6], [1, 0.1], [-0.2, 1]], dtype=torch.float64)
    d_st, i_st = reference.knn(sources, targets, 3, "cosine")
    d_ts, _ = reference.knn(targets, sources, 3, "cosine")
    secondary, indices = hubness.reduce_hubness(d_st, i_st, "csls", reference_distances=d_ts, neighbors=1)
    csls = -_as_matrix(secondary, indices)
    expected = torch.tensor([[-0.355037, 0, -2.36785], [0, -0.601787, -0.606991]], dtype=torch.float64)
    assert torch.allclose(csls[:2], expected, atol=2e-6)
    assert indices[:, 0].tolist() == [1, 0, 2]  # the best target per source is unchanged here


def test_reduction_lowers_hubness_on_gaussian_data():
    """The point of the methods: the re-ranked top-1 lists have a less skewed k-occurrence."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1500, 128, generator=gen, dtype=torch.float64)
    with fastnotes.use_backend("numba"):
        distances, indices = hubness.knn(x, 30)
    base = hubness.hubness_stats(torch.bincount(indices[:, :5].reshape(-1), minlength=1500), 5)["skewness"]
    for method in ("mutual_proximity", "local_scaling", "nicdm", "dissim_local"):
        given = distances if method == "dissim_local" else distances.sqrt()
        _, reranked = hubness.reduce_hubness(given, indices, method, vectors=x if method == "dissim_local" else None)
        skew = hubness.hubness_stats(torch.bincount(reranked[:, :5].reshape(-1), minlength=1500), 5)["skewness"]
        assert skew < 0.7 * base, method


def test_reduction_bad_input():
    d, i = _all_others(H_G)
    with pytest.raises(ValueError, match="method must be one of"):
        hubness.reduce_hubness(d, i, "dsl")
    with pytest.raises(ValueError, match="neighbors must be None"):
        hubness.reduce_hubness(d, i, "mutual_proximity", neighbors=2)
    with pytest.raises(ValueError, match="indices must lie in"):
        hubness.reduce_hubness(d, i + 3, "nicdm")
    with pytest.raises(ValueError, match="neighbors must be an int"):
        hubness.reduce_hubness(d, i, "local_scaling", neighbors=9)
    with pytest.raises(ValueError, match=r"\[n, k\]"):
        hubness.reduce_hubness(d, i[:, :2], "nicdm")
    with pytest.raises(TypeError, match="indices must have dtype"):
        hubness.reduce_hubness(d, i.double(), "nicdm")


# ---- hub-prior sampling ---------------------------------------------------------------------------

def test_hub_sample_spec_operating_point():
    """H-F: numpy default_rng(2022) continued after the H-E draws, n = 10000, d = 512 float32 data,
    k = 5: 189 points pass Su's N_5 > 50, 194 pass N_5 >= 50, 158 pass the Colab's 1 + N_4 >= 50
    (self included). float64 distances, as in the spec."""
    rng = np.random.default_rng(2022)
    for d in (3, 64, 512):
        rng.standard_normal((2000, d))
    pool = torch.from_numpy(rng.standard_normal((10000, 512)).astype(np.float32)).double()
    draws = []

    def sample_fn(m):
        draws.append(m)
        return pool

    with fastnotes.use_backend("numba"):
        counts = hubness.k_occurrence(pool, 5)
        assert (counts > 50).sum().item() == 189 and (counts >= 50).sum().item() == 194
        su = hubness.hub_sample(sample_fn, 189, k=5, threshold=50, strict=True, max_pools=1)
        assert torch.equal(su, pool[counts > 50])
        with pytest.raises(RuntimeError, match="only 158 of 159 latents passed N_5 >= 50 in 1 pools"):
            hubness.hub_sample(sample_fn, 159, k=5, threshold=50, include_self=True, max_pools=1)
    assert draws == [10000] * 2


def test_hub_sample_batches_pools_and_feature_fn():
    gen = torch.Generator().manual_seed(11)
    pools = []

    def sample_fn(m):
        pools.append(torch.randn(m, 4, 4, generator=gen))
        return pools[-1]

    features = []
    with fastnotes.use_backend("numba"):
        out = hubness.hub_sample(sample_fn, 40, k=5, threshold=15, pool_size=500,
                                 feature_fn=lambda z: features.append(z) or z.flatten(1) * 2)
        assert out.shape == (40, 4, 4) and len(pools) >= 2 and len(features) == len(pools)
        expected = torch.cat([p[hubness.k_occurrence(p.flatten(1), 5) >= 15] for p in pools])[:40]
    assert torch.equal(out, expected)
    with pytest.raises(ValueError, match="must return a tensor with 500 rows"):
        hubness.hub_sample(lambda m: torch.randn(m - 1, 3), 1, pool_size=500)
    with pytest.raises(ValueError, match="n must be"):
        hubness.hub_sample(sample_fn, 0)


# ---- CLI and self-check ---------------------------------------------------------------------------

def test_cli_prints_statistics_hubs_and_plots(tmp_path):
    x = np.random.default_rng(5).integers(-3, 4, size=(400, 6)).astype(np.float32)
    path = tmp_path / "x.npy"
    np.save(path, x)
    plot = tmp_path / "nk.png"
    out = subprocess.run([sys.executable, "-m", "fastnotes", "hubness", str(path), "--k", "5", "--top", "3",
                          "--plot", str(plot)], check=False, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    counts = reference.k_occurrence(torch.from_numpy(x), None, 5)
    stats = hubness.hubness_stats(counts, 5)
    assert f"skewness             {stats['skewness']:.6g}" in out.stdout
    top = torch.argsort(counts, descending=True, stable=True)[:3].tolist()
    assert "top 3 hubs (index: N_5): " + ", ".join(f"{i}: {counts[i].item()}" for i in top) in out.stdout
    assert plot.stat().st_size > 1000 and plot.read_bytes()[:4] == b"\x89PNG"


def test_cli_errors(tmp_path, capsys):
    from fastnotes.__main__ import main

    path = tmp_path / "x.npy"
    np.save(path, np.zeros((5, 2), dtype=np.float32))
    with pytest.raises(SystemExit, match="k must satisfy"):
        main(["hubness", str(path), "--k", "4"])
    np.save(path, np.zeros(5))
    with pytest.raises(SystemExit, match=r"real \[n, d\] array"):
        main(["hubness", str(path)])


def test_selfcheck_case_passes():
    from fastnotes import _selfcheck

    assert "k_occurrence" in _selfcheck.OPS
    check, _ = _selfcheck.OPS["k_occurrence"]
    with fastnotes.use_backend("numba"):
        assert check(torch.device("cpu"), torch.float32) == {"value_error": 0.0, "grad_error": 0.0}
