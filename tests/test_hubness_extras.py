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


# ---- properties (hypothesis) ------------------------------------------------------------------------

from hubness_cases import assert_exact, float64_slack, true_distances  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from oracle import property_settings  # noqa: E402

PROPERTY = property_settings(25)


@st.composite
def knn_problems(draw):
    """Random sizes, k from 1 to its largest legal value, an offset and a scale from 1e-20 to 1e15,
    one set or a reference set, contiguous or strided rows, float32 or float64."""
    n, d = draw(st.integers(3, 40)), draw(st.integers(1, 6))
    m = draw(st.none() | st.integers(2, 40))
    exclude_self = draw(st.booleans())
    candidates = n - 1 if (m is None and exclude_self) else (m or n)
    k = draw(st.integers(1, candidates - 1))
    scale = 10.0 ** draw(st.integers(-20, 15))
    offset = draw(st.sampled_from([0.0, 1.0, -3e3, 1e5])) * scale * draw(st.sampled_from([1, 1000]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))

    def points(rows):
        wide = offset + scale * torch.randn(rows, 2 * d, generator=gen, dtype=torch.float64)
        wide[torch.rand(rows, generator=gen) < 0.1] = offset  # duplicates
        return wide.to(dtype)[:, ::2] if draw(st.booleans()) else wide.to(dtype)[:, :d].contiguous()

    return points(n), None if m is None else points(m), k, exclude_self, draw(st.sampled_from(hubness.METRICS))


@pytest.mark.parametrize("backend_name", ["numba", "reference"])
@PROPERTY
@given(problem=knn_problems())
def test_knn_property_exact(backend_name, problem):
    """Every list is exact to the rounding of the output dtype (float32 subnormals included), counts
    are the lists' bincount, and nothing is NaN."""
    x, ref, k, exclude_self, metric = problem
    out_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x_max, ref_max = x.abs().max().item(), (x if ref is None else ref).abs().max().item()
    if metric == "ip" and x_max * ref_max * x.shape[1] > torch.finfo(out_dtype).max:  # refused: see knn
        with pytest.raises(ValueError, match="can overflow"):
            hubness.knn(x, k, reference=ref, metric=metric, exclude_self=exclude_self)
        return
    with fastnotes.use_backend(backend_name):
        distances, indices = hubness.knn(x, k, reference=ref, metric=metric, exclude_self=exclude_self)
        counts = hubness.k_occurrence(x, k, reference=ref, metric=metric, exclude_self=exclude_self)
    true = true_distances(x, x if ref is None else ref, metric)
    slack = float64_slack(x, true, metric) if out_dtype == torch.float64 else 2.0 ** -149
    assert not distances.isnan().any()
    assert_exact(distances, indices, true, k, exclude_self and ref is None, out_dtype, slack)
    assert torch.equal(counts, torch.bincount(indices.reshape(-1), minlength=true.shape[1]))


@PROPERTY
@given(n=st.integers(3, 12), d=st.integers(1, 4), k=st.integers(-2, 14),
       bad=st.sampled_from(["nan_x", "inf_reference", "x_3d", "int_x", "reference_width", "k_float", "metric"]))
def test_knn_property_bad_input_names_the_argument(n, d, k, bad):
    """Bad inputs raise ValueError/TypeError naming the argument, before any kernel runs; a k out of
    range names k."""
    x, ref, metric, kk = torch.randn(n, d), None, "sqeuclidean", 1
    if bad == "nan_x":
        x[n // 2, 0] = float("nan")
    elif bad == "inf_reference":
        ref = torch.randn(n + 1, d)
        ref[0, -1] = float("inf")
    elif bad == "x_3d":
        x = x[None]
    elif bad == "int_x":
        x = x.long()
    elif bad == "reference_width":
        ref = torch.randn(n, d + 1)
    elif bad == "k_float":
        kk = 1.0
    else:
        metric = "l2"
    name = {"nan_x": "x", "inf_reference": "reference", "x_3d": "x", "int_x": "x", "reference_width": "reference",
            "k_float": "k", "metric": "metric"}[bad]
    for fn in (hubness.knn, hubness.k_occurrence):
        with pytest.raises((ValueError, TypeError)) as error:
            fn(x, kk, reference=ref, metric=metric)
        assert f"{name} " in str(error.value)
    good = torch.randn(n, d)
    if not 1 <= k < n - 1:
        with pytest.raises(ValueError, match="k must satisfy"):
            hubness.knn(good, k)
