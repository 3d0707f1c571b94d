"""fastnotes.hubness.knn / k_occurrence on every backend against the float64 brute-force reference
and the spec oracles (docs/hubness.md, worked examples), hubness_stats against the spec oracles and scipy."""
import importlib.util
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import DEVICE
from hubness_cases import assert_exact, float64_slack, true_distances

import fastnotes
from fastnotes import hubness
from fastnotes.reference import hubness as reference

scipy_stats = pytest.importorskip("scipy.stats")


def _backends():
    found = ["numba", "reference"]
    if fastnotes._dispatch.availability("triton", DEVICE) is None:
        try:
            found.append("triton" if importlib.util.find_spec("fastnotes.kernels.triton.hubness") else None)
        except ImportError:
            pass
    if fastnotes._dispatch.availability("cuda", DEVICE) is None:
        found.append("cuda")
    return [b for b in found if b and fastnotes._dispatch.availability(b, DEVICE) is None]


@pytest.fixture(params=_backends())
def hub_backend(request):
    if request.param == "triton":  # written concurrently by another module owner: skip if it does not import
        pytest.importorskip("fastnotes.kernels.triton.hubness")
    with fastnotes.use_backend(request.param):
        yield request.param


def _dtypes(backend):
    return (torch.float32,) if backend in ("triton", "cuda") else (torch.float32, torch.float64)


def _t(rows, dtype=torch.float32):
    return torch.tensor(rows, dtype=dtype, device=DEVICE)


# ---- spec oracles ----------------------------------------------------------------------------------

H_A = [[0.0], [1.0], [3.0], [4.0], [10.0]]
H_A2 = [[0, 0], [1, 0], [-1, 0], [0, 1], [0, -1], [5, 5]]
ORACLE_KNN = [
    ("H-A k=1", H_A, 1, [[1], [0], [3], [2], [3]], [1, 1, 1, 2, 0]),
    ("H-A k=2", H_A, 2, [[1, 2], [0, 2], [3, 1], [2, 1], [3, 2]], [1, 3, 4, 2, 0]),
    ("H-A2 k=1", H_A2, 1, [[1], [0], [0], [0], [0], [1]], [4, 2, 0, 0, 0, 0]),
    ("H-A2 k=2", H_A2, 2, [[1, 2], [0, 3], [0, 3], [0, 1], [0, 1], [1, 3]], [4, 4, 1, 3, 0, 0]),
    ("H-B", [[0.0], [1.0], [2.0]], 1, [[1], [0], [1]], [1, 2, 0]),
    ("H-C exclude", [[0, 0], [0, 0], [5, 0]], 1, [[1], [0], [0]], [2, 1, 0]),
]


@pytest.mark.parametrize("name, points, k, expected_knn, expected_counts", ORACLE_KNN, ids=[o[0] for o in ORACLE_KNN])
def test_spec_oracles_self_excluded(hub_backend, name, points, k, expected_knn, expected_counts):
    for dtype in _dtypes(hub_backend):
        x = _t(points, dtype)
        distances, indices = hubness.knn(x, k)
        assert indices.tolist() == expected_knn
        exact = reference.pairwise_distances(x.cpu(), x.cpu()).gather(1, torch.tensor(expected_knn))
        assert torch.allclose(distances.double().cpu(), exact, atol=1e-6)
        assert hubness.k_occurrence(x, k).tolist() == expected_counts


def test_spec_oracle_self_included(hub_backend):
    """H-C with include_candidate: self competes at distance 0 (ties to the smaller index)."""
    x = _t([[0, 0], [0, 0], [5, 0]])
    _, indices = hubness.knn(x, 2, exclude_self=False)
    assert indices.tolist() == [[0, 1], [0, 1], [2, 0]]
    assert hubness.k_occurrence(x, 2, exclude_self=False).tolist() == [3, 2, 1]


def test_spec_oracle_query_not_reference(hub_backend):
    """H-D: counts over the reference set, sum = k n_q; exclude_self has no effect on another set."""
    ref = _t([[0, 0], [1, 0], [0, 2], [3, 3]])
    q = _t([[0.2, 0.1], [2.9, 2.5], [0.9, 0.4]])
    for exclude_self in (True, False):
        _, indices = hubness.knn(q, 2, reference=ref, exclude_self=exclude_self)
        assert indices.tolist() == [[0, 1], [3, 2], [1, 0]]
        assert hubness.k_occurrence(q, 2, reference=ref, exclude_self=exclude_self).tolist() == [2, 2, 1, 1]


# ---- random data against the float64 reference ------------------------------------------------------

def _shapes(backend):
    # the Triton interpreter costs ~ms per program: small shapes there
    if backend == "triton" and DEVICE == "cpu":
        return [(37, 50, 3, 3), (70, None, 5, 4)]
    if backend == "reference":  # the oracle itself: only the API plumbing is under test
        return [(150, 170, 4, 6), (33, None, 3, 1)]
    return [(1300, None, 5, 10), (600, 1500, 7, 9), (33, None, 3, 1)]


def test_integer_data_matches_reference_exactly(hub_backend, rng):
    """Small integers: every distance is exact in float32 (expanded formula included), so the kNN
    lists, the many exact ties among them and the counts must equal the reference exactly; the
    shapes cross several query and reference tiles."""
    for n, m, d, k in _shapes(hub_backend):
        x = torch.randint(-3, 4, (n, d), generator=rng).float().to(DEVICE)
        ref = None if m is None else torch.randint(-3, 4, (m, d), generator=rng).float().to(DEVICE)
        for metric in ("sqeuclidean", "ip"):
            for exclude_self in (True, False):
                kw = {"reference": ref, "metric": metric, "exclude_self": exclude_self}
                distances, indices = hubness.knn(x, k, **kw)
                exact_d, exact_i = reference.knn(x.cpu(), None if ref is None else ref.cpu(), k, metric, exclude_self)
                assert torch.equal(indices.cpu(), exact_i), (n, m, metric, exclude_self)
                assert torch.equal(distances.double().cpu(), exact_d)
                counts = hubness.k_occurrence(x, k, **kw)
                assert counts.dtype == torch.int64
                n_ref = x.shape[0] if ref is None else ref.shape[0]
                assert torch.equal(counts.cpu(), torch.bincount(exact_i.reshape(-1), minlength=n_ref))
                assert counts.sum().item() == k * n


@pytest.mark.parametrize("metric", ["sqeuclidean", "cosine", "ip"])
def test_gaussian_data_matches_reference(hub_backend, rng, metric):
    """Continuous data, a zero row included (cosine distance 1 to everything): the exact lists."""
    n, d, k = (60, 8, 4) if hub_backend == "triton" and DEVICE == "cpu" else (400, 16, 6)
    base = torch.randn(n, d, generator=rng, dtype=torch.float64)
    base[3] = 0.0
    for dtype in _dtypes(hub_backend):
        x = base.to(dtype)
        distances, indices = hubness.knn(x.to(DEVICE), k, metric=metric)
        out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        true = true_distances(x, x, metric)
        assert_exact(distances, indices, true, k, True, out_dtype, float64_slack(x, true, metric))


@pytest.mark.parametrize("metric", ["sqeuclidean", "cosine", "ip"])
def test_distances_gradient(rng, metric):
    """With inputs that require grad, knn's distances carry the gradient of the selected pairs
    (gradcheck in float64 on x and on a separate reference set); the lists are unchanged."""
    x = torch.randn(12, 3, generator=rng, dtype=torch.float64)
    y = torch.randn(9, 3, generator=rng, dtype=torch.float64)
    with fastnotes.use_backend("numba"):
        plain_d, plain_i = hubness.knn(x, 4, metric=metric)
        grad_d, grad_i = hubness.knn(x.clone().requires_grad_(), 4, metric=metric)
        assert grad_d.requires_grad and torch.equal(grad_i, plain_i)
        assert torch.allclose(grad_d.detach(), plain_d, rtol=1e-12, atol=1e-12)
        torch.autograd.gradcheck(lambda a: hubness.knn(a, 4, metric=metric)[0], (x.clone().requires_grad_(),))
        torch.autograd.gradcheck(lambda a, b: hubness.knn(a, 3, reference=b, metric=metric)[0],
                                 (x.clone().requires_grad_(), y.clone().requires_grad_()))
        assert not hubness.knn(x, 4, metric=metric)[0].requires_grad


def test_half_precision_inputs_are_widened(rng):
    x = torch.randint(-3, 4, (200, 6), generator=rng).float()
    exact = reference.k_occurrence(x, None, 5)
    for dtype in (torch.float16, torch.bfloat16):
        with fastnotes.use_backend("numba"):
            assert torch.equal(hubness.k_occurrence(x.to(dtype), 5), exact)
            distances, _ = hubness.knn(x.to(dtype), 5)
            assert distances.dtype == torch.float32


def test_non_contiguous_input(rng):
    x = torch.randint(-3, 4, (9, 300), generator=rng).float().T  # [300, 9], column-major
    with fastnotes.use_backend("numba"):
        assert torch.equal(hubness.k_occurrence(x, 4), reference.k_occurrence(x.contiguous(), None, 4))


def test_numba_keeps_torch_thread_count():
    """numba's OpenMP layer shares torch's libgomp; starting it (the first direct-distance pass) must
    leave a process set to 1 thread at 1 (a rank of a group ran 2 and oversubscribed the cores).
    A fresh process: in this one the layer may have started already."""
    code = ("import torch; torch.set_num_threads(1); import fastnotes; from fastnotes import hubness\n"
            "with fastnotes.use_backend('numba'): hubness.k_occurrence(torch.randn(300, 8), 5)\n"
            "print(torch.get_num_threads())")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split()[-1] == "1"


def test_results_do_not_depend_on_tiling(rng, monkeypatch):
    """The (distance, index) order makes the selected sets independent of tile sizes and threads."""
    from fastnotes.kernels.numba import hubness as kernel

    x = torch.randint(-2, 3, (700, 4), generator=rng).float()
    with fastnotes.use_backend("numba"):
        base = hubness.knn(x, 8)
        for tq, tr in ((64, 96), (700, 33), (1, 1024)):
            monkeypatch.setattr(kernel, "TILE_Q", tq)
            monkeypatch.setattr(kernel, "TILE_R", tr)
            got = hubness.knn(x, 8)
            assert torch.equal(got[1], base[1])  # integer data: exact ties, integer logic
            torch.testing.assert_close(got[0], base[0], rtol=0, atol=0)


def test_colab_value_is_exclude_counts_plus_one(rng):
    """Spec section 6: include-self counts with k equal 1 + exclude-self counts with k - 1 (no duplicates)."""
    x = torch.randn(500, 16, generator=rng, dtype=torch.float64)
    with fastnotes.use_backend("numba"):
        assert torch.equal(hubness.k_occurrence(x, 5, exclude_self=False), hubness.k_occurrence(x, 4) + 1)


def test_concurrent_calls_restore_torch_threads(rng):
    """The numba launcher sets torch's (global) thread count to 1 while it runs: calls from several
    threads at once still give exact results and leave the user's setting in place."""
    from concurrent.futures import ThreadPoolExecutor

    threads = torch.get_num_threads()
    xs = [torch.randint(-3, 4, (1100 + 7 * i, 5), generator=rng).float() for i in range(4)]
    with ThreadPoolExecutor(4) as pool:  # automatic dispatch picks numba for CPU tensors in each thread
        results = list(pool.map(lambda x: fastnotes.hubness.k_occurrence(x, 6), xs))
    for x, counts in zip(xs, results):
        assert torch.equal(counts, reference.k_occurrence(x, None, 6))
    assert torch.get_num_threads() == threads


# ---- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("call, error, match", [
    (lambda x: hubness.knn(x, 9), ValueError, r"k must satisfy 1 <= k < 9"),     # k >= n - 1 with self excluded
    (lambda x: hubness.knn(x, 10, exclude_self=False), ValueError, "k must satisfy"),
    (lambda x: hubness.knn(x, 4, reference=x[:4]), ValueError, "k must satisfy"),
    (lambda x: hubness.k_occurrence(x, 0), ValueError, "k must satisfy"),
    (lambda x: hubness.k_occurrence(x, 2.0), TypeError, "k must be an int"),
    (lambda x: hubness.k_occurrence(x[:0], 1), ValueError, "empty"),
    (lambda x: hubness.k_occurrence(x[0], 1), ValueError, r"x must be \[n, d\]"),
    (lambda x: hubness.k_occurrence(x.long(), 1), TypeError, "x must have dtype"),
    (lambda x: hubness.k_occurrence(x, 1, reference=x[:, :2]), ValueError, "reference must be"),
    (lambda x: hubness.k_occurrence(x, 1, reference=x.double()), TypeError, "reference has dtype"),
    (lambda x: hubness.k_occurrence(x, 1, metric="euclidean"), ValueError, "metric must be one of"),
    (lambda x: hubness.k_occurrence(x, 1, exclude_self=1), TypeError, "exclude_self"),
    (lambda x: hubness.k_occurrence(torch.where(x > 0.5, float("nan"), x), 1), ValueError, "NaN or infinite"),
])
def test_bad_input_raises(call, error, match):
    x = torch.rand(10, 3)
    with pytest.raises(error, match=match):
        call(x)


# ---- statistics ----------------------------------------------------------------------------------

STAT_ORACLES = [  # (counts, k, expected) from docs/hubness.md, 'Worked examples'
    ([1, 1, 1, 2, 0], 1, {"skewness": 0, "robinhood": 0.2, "gini": 0.32, "antihub_occurrence": 0.2,
                          "hub_occurrence": 0.4, "atkinson": 0.220588745, "groupie_ratio": 0.4}),
    ([1, 3, 4, 2, 0], 2, {"skewness": 0, "robinhood": 0.3, "gini": 0.4, "antihub_occurrence": 0.2,
                          "hub_occurrence": 0.4, "atkinson": 0.2444686859, "groupie_ratio": 0.4}),
    ([4, 2, 0, 0, 0, 0], 1, {"skewness": 1.1222634355, "robinhood": 0.6666666667, "gini": 0.7222222222,
                             "antihub_occurrence": 0.6666666667, "hub_occurrence": 1.0, "atkinson": 0.6761984931,
                             "groupie_ratio": 0.6666666667}),
    ([4, 4, 1, 3, 0, 0], 2, {"skewness": 0, "robinhood": 0.4166666667, "gini": 0.4722222222,
                             "antihub_occurrence": 0.3333333333, "hub_occurrence": 0.6666666667,
                             "atkinson": 0.3705484989}),
]


@pytest.mark.parametrize("counts, k, expected", STAT_ORACLES)
def test_stats_spec_oracles(counts, k, expected):
    got = hubness.hubness_stats(torch.tensor(counts), k)
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, abs=2e-9), name


def test_stats_against_scipy_and_pairwise_definitions(rng):
    counts = torch.randint(0, 30, (257,), generator=rng) ** 2 // 20
    k = 7
    got = hubness.hubness_stats(counts, k)
    c = counts.double().numpy()
    assert got["skewness"] == pytest.approx(scipy_stats.skew(c, bias=True), rel=1e-10)
    a = -c.mean() / c.std(ddof=1)
    assert got["skewness_truncnorm"] == pytest.approx(float(scipy_stats.truncnorm.stats(a, np.inf, moments="s")),
                                                      rel=1e-8)
    assert got["gini"] == pytest.approx(np.abs(c[:, None] - c[None, :]).sum() / (2 * len(c) * c.sum()), rel=1e-12)
    assert got["robinhood"] == pytest.approx(np.abs(c - c.mean()).sum() / (2 * c.sum()), rel=1e-12)


def test_stats_constant_counts_and_bad_input():
    got = hubness.hubness_stats(torch.full((10,), 3), 3)
    assert got["skewness"] == 0 and got["skewness_truncnorm"] == 0 and got["gini"] == 0 and got["robinhood"] == 0
    assert hubness.hubness_stats(torch.zeros(4, dtype=torch.int64), 1)["gini"] == 0  # sum 0 guarded
    with pytest.raises(TypeError, match="integer"):
        hubness.hubness_stats(torch.rand(5), 1)
    with pytest.raises(ValueError, match="k must be"):
        hubness.hubness_stats(torch.ones(5, dtype=torch.int64), 0)
    with pytest.raises(ValueError, match="1-D"):
        hubness.hubness_stats(torch.ones(2, 2, dtype=torch.int64), 1)


def test_spec_oracle_random_gaussian_hubness_grows_with_dimension():
    """H-E: numpy default_rng(2022), n = 2000, k = 5, float64, d = 3, 64, 512 drawn in that order;
    the skew of N_5 at d = 512 and 64 is far above d = 3 (the hubness effect)."""
    rng = np.random.default_rng(2022)
    table = {3: (0.129131, 0.143700, 0.206114, 0.0030, 0.018600, 12),
             64: (7.237065, 0.542700, 0.712906, 0.2990, 0.640300, 190),
             512: (5.601305, 0.628900, 0.794967, 0.4235, 0.730700, 164)}
    with fastnotes.use_backend("numba"):
        for d, (skew, rh, gini, antihub, hub_occ, max_n) in table.items():
            z = torch.from_numpy(rng.standard_normal((2000, d)))
            counts = hubness.k_occurrence(z, 5)
            s = hubness.hubness_stats(counts, 5)
            assert s["skewness"] == pytest.approx(skew, abs=2e-6)
            assert s["robinhood"] == pytest.approx(rh, abs=2e-6)
            assert s["gini"] == pytest.approx(gini, abs=2e-6)
            assert s["antihub_occurrence"] == pytest.approx(antihub, abs=1e-9)
            assert s["hub_occurrence"] == pytest.approx(hub_occ, abs=2e-6)
            assert s["max"] == max_n
            assert torch.equal(hubness.k_occurrence(z, 5, exclude_self=False), hubness.k_occurrence(z, 4) + 1)
    # the effect on float32 Gaussian data at d = 4 vs d = 512
    gen = torch.Generator().manual_seed(7)
    low = hubness.hubness_stats(hubness.k_occurrence(torch.randn(2000, 4, generator=gen), 10), 10)["skewness"]
    high = hubness.hubness_stats(hubness.k_occurrence(torch.randn(2000, 512, generator=gen), 10), 10)["skewness"]
    assert high > low + 2


def test_overflowing_distances_rank_as_infinity():
    """Finite float32 inputs whose squared distances overflow: every distance is +inf (NaN from
    inf - inf ranks as +inf too), so each row takes the k smallest other indices and every slot fills."""
    x = torch.randn(40, 4, generator=torch.Generator().manual_seed(0)) * 1e20
    with fastnotes.use_backend("numba"):
        distances, indices = hubness.knn(x, 3)
        counts = hubness.k_occurrence(x, 3)
    expected = [[j for j in range(40) if j != i][:3] for i in range(40)]
    assert indices.tolist() == expected
    assert torch.isinf(distances).all()
    assert counts.sum().item() == 120 and counts[:4].tolist() == [39, 39, 39, 3]


def test_ip_distances_that_overflow_are_refused():
    """-<x, y> of float32 rows of -3e19 is -9e38: beyond float32, where no ranking is right."""
    x = torch.full((4, 1), -3e19)
    with pytest.raises(ValueError, match="can overflow float32"):
        hubness.knn(x, 1, metric="ip")
    distances, _ = hubness.knn(x.double(), 1, metric="ip")
    assert torch.allclose(distances, torch.full((4, 1), -9e38, dtype=torch.float64))


# ---- exactness away from the origin (issue 18 item 2) ------------------------------------------------

def assert_counts(counts, true, k, exclude_self):
    """Counts equal the oracle's where no row has a near-tie at its k-th neighbour (float32 rounding)."""
    true = true.clone()
    if exclude_self:
        true.fill_diagonal_(float("inf"))
    values, order = torch.sort(true, dim=1, stable=True)
    want = torch.bincount(order[:, :k].reshape(-1), minlength=true.shape[1])
    gap = values[:, k] - values[:, k - 1]
    assert bool((gap > 4 * 2.0 ** -24 * values[:, k].abs()).all()), "near-tie in the test data: redraw"
    wrong = int((counts.cpu() != want).sum())
    assert wrong == 0, f"{wrong} of {len(want)} counts differ from the oracle's"


@pytest.mark.parametrize("metric", ["sqeuclidean", "cosine", "ip"])
@pytest.mark.parametrize("n, d, k", [(200, 8, 1), (400, 16, 5)])
def test_exact_far_from_the_origin(hub_backend, metric, n, d, k):
    """x = 100 + 0.1 randn: the expanded |y|^2 - 2 x.y cancels (in float32 85 of 200 nearest
    neighbours were wrong before centring and re-ranking); lists and counts must be the true ones."""
    gen = torch.Generator().manual_seed(n + d)
    base = 100 + 0.1 * torch.randn(n, d, generator=gen, dtype=torch.float64)
    for dtype in _dtypes(hub_backend):
        x = base.to(dtype)
        true = true_distances(x, x, metric)
        out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        distances, indices = hubness.knn(x.to(DEVICE), k, metric=metric)
        assert_exact(distances, indices, true, k, True, out_dtype, float64_slack(x, true, metric))
        assert_counts(hubness.k_occurrence(x.to(DEVICE), k, metric=metric), true, k, True)


def _cases(backend):
    """(n, m, d): one set, and a separate reference set; small under the Triton interpreter."""
    return [(150, None, 6), (90, 130, 5)] if backend == "triton" and DEVICE == "cpu" else [(300, None, 6), (200, 350, 5)]


@pytest.mark.parametrize("metric", ["sqeuclidean", "cosine", "ip"])
def test_exact_with_a_reference_set_and_self_included(hub_backend, metric, rng):
    """Offset data with reference= another set, and with self competing (exclude_self=False: self is
    the nearest at exactly 0 for sqeuclidean and cosine unless a duplicate ties it)."""
    for n, m, d in _cases(hub_backend):
        x = 50 + 0.01 * torch.randn(n, d, generator=rng)
        ref = None if m is None else 50 + 0.01 * torch.randn(m, d, generator=rng)
        for exclude_self in (True, False):
            kw = {"reference": None if ref is None else ref.to(DEVICE), "metric": metric, "exclude_self": exclude_self}
            distances, indices = hubness.knn(x.to(DEVICE), 4, **kw)
            assert_exact(distances, indices, true_distances(x, x if ref is None else ref, metric), 4,
                         exclude_self and ref is None, torch.float32)
            if ref is None and not exclude_self and metric != "ip":
                assert torch.equal(indices[:, 0].cpu(), torch.arange(n)) and bool((distances[:, 0] == 0).all())
            counts = hubness.k_occurrence(x.to(DEVICE), 4, **kw)
            assert torch.equal(counts.cpu(), torch.bincount(indices.cpu().reshape(-1), minlength=(m or n)))


@pytest.mark.parametrize("metric", ["sqeuclidean", "cosine", "ip"])
def test_every_row_through_the_float64_fallback(hub_backend, metric, rng, monkeypatch):
    """MARGIN = 0 leaves no row certifiable: every row is redone by the float64 full search, which
    must give the same exact lists (one set and another reference set, self excluded or not)."""
    if hub_backend == "reference":
        pytest.skip("the reference backend has no fast pass")
    from fastnotes.hubness import _exact

    searched = []
    full_search = _exact._full_search
    monkeypatch.setattr(_exact, "MARGIN", 0)
    monkeypatch.setattr(_exact, "_full_search", lambda p, rows, k: searched.append(len(rows)) or full_search(p, rows, k))
    for n, m, d in _cases(hub_backend):
        x = 20 + 0.1 * torch.randn(n, d, generator=rng)
        ref = None if m is None else 20 + 0.1 * torch.randn(m, d, generator=rng)
        for exclude_self in (True, False):
            searched.clear()
            kw = {"reference": None if ref is None else ref.to(DEVICE), "metric": metric, "exclude_self": exclude_self}
            distances, indices = hubness.knn(x.to(DEVICE), 3, **kw)
            assert sum(searched) == n
            assert_exact(distances, indices, true_distances(x, x if ref is None else ref, metric), 3,
                         exclude_self and ref is None, torch.float32)


def test_rows_the_fast_pass_cannot_rank_are_redone(hub_backend):
    """An outlier 1e4 away makes the float32 error of every ranking value ~0.1 while a cluster's
    distances are ~1e-6: the fast pass orders the cluster at random, no cluster row is certified,
    and the float64 full search must still find the exact neighbours."""
    gen = torch.Generator().manual_seed(5)
    x = 1e-3 * torch.randn(60, 4, generator=gen)
    x[0] = 1e4
    distances, indices = hubness.knn(x.to(DEVICE), 3)
    assert_exact(distances, indices, true_distances(x, x, "sqeuclidean"), 3, True, torch.float32)
    counts = hubness.k_occurrence(x.to(DEVICE), 3)  # the outlier's neighbours tie within float32 rounding
    assert torch.equal(counts.cpu(), torch.bincount(indices.cpu().reshape(-1), minlength=60))


@pytest.mark.parametrize("exclude_self", [True, False])
def test_cosine_zero_rows(hub_backend, exclude_self, rng):
    """Zero vectors have cosine distance 1 to everything (each other included): more zero references
    than k + 1 (only the first k + 1 are candidates), zero queries (the first k indices), both in one
    set and across sets."""
    x = torch.randn(40, 3, generator=rng)
    x[torch.randperm(40, generator=rng)[:12]] = 0.0
    ref = torch.randn(30, 3, generator=rng)
    ref[torch.randperm(30, generator=rng)[:9]] = 0.0
    for r in (None, ref):
        distances, indices = hubness.knn(x.to(DEVICE), 5, reference=None if r is None else r.to(DEVICE),
                                         metric="cosine", exclude_self=exclude_self)
        true = true_distances(x, x if r is None else r, "cosine")
        assert_exact(distances, indices, true, 5, exclude_self and r is None, torch.float32)
        zero = (x == 0).all(1)
        first = [[j for j in range(6) if not (exclude_self and r is None and j == i)][:5] for i in range(40)]
        assert indices[zero].tolist() == [row for row, z in zip(first, zero) if z]
    # every non-zero reference points away (distance > 1): the zero ones (distance 1) come first
    away = torch.tensor([[-1.0, 0.1 * j, 0.0] for j in range(20)])
    away[[3, 6, 7, 9, 12, 15, 16]] = 0.0
    distances, indices = hubness.knn(torch.tensor([[1.0, 0.0, 0.0]]).to(DEVICE), 5, reference=away.to(DEVICE),
                                     metric="cosine", exclude_self=exclude_self)
    assert indices.tolist() == [[3, 6, 7, 9, 12]] and distances.tolist() == [[1.0] * 5]


def test_numba_tiles_and_threads_on_offset_data(rng, monkeypatch):
    """Query blocks and reference tiles with tails (and one block per thread) on offset data, against
    the oracle: the candidates of every tile reach refine with the right global indices."""
    from fastnotes.kernels.numba import hubness as kernel

    x = 100 + 0.1 * torch.randn(700, 6, generator=rng)
    ref = 100 + 0.1 * torch.randn(500, 6, generator=rng)
    true = true_distances(x, x, "sqeuclidean")
    with fastnotes.use_backend("numba"):
        for tq, tr in ((64, 96), (700, 33), (1, 1024)):
            monkeypatch.setattr(kernel, "TILE_Q", tq)
            monkeypatch.setattr(kernel, "TILE_R", tr)
            assert_exact(*hubness.knn(x, 6), true, 6, True, torch.float32)
            assert_exact(*hubness.knn(x, 6, reference=ref), true_distances(x, ref, "sqeuclidean"), 6, False,
                         torch.float32)


@pytest.mark.parametrize("metric", ["sqeuclidean", "cosine", "ip"])
def test_double_backward_through_the_distances(hub_backend, metric, rng):
    """The differentiable distances are plain float64 torch ops over the selected pairs: double
    backward works and matches finite differences (gradgradcheck), for x and a reference set."""
    x = torch.randn(10, 3, generator=rng, dtype=torch.float64)
    y = torch.randn(8, 3, generator=rng, dtype=torch.float64)
    if hub_backend == "triton":
        x, y = x.float(), y.float()
        leaf = x.clone().requires_grad_()
        distances, _ = hubness.knn(leaf, 3, metric=metric)
        (g,) = torch.autograd.grad(distances.sum(), leaf, create_graph=True)
        (g ** 2).sum().backward()
        assert leaf.grad is not None and bool(torch.isfinite(leaf.grad).all())
        return
    torch.autograd.gradgradcheck(lambda a: hubness.knn(a, 3, metric=metric)[0], (x.clone().requires_grad_(),))
    torch.autograd.gradgradcheck(lambda a, b: hubness.knn(a, 3, reference=b, metric=metric)[0],
                                 (x.clone().requires_grad_(), y.clone().requires_grad_()))


def test_autocast_keeps_float32(hub_backend, rng):
    """Under CPU autocast (bfloat16) the distances stay float32 (as cdist does under autocast) and the
    lists stay exact: the fast pass's GEMM is not turned into bfloat16."""
    x = (100 + 0.1 * torch.randn(120, 8, generator=rng)).to(DEVICE)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        distances, indices = hubness.knn(x, 4)
        counts = hubness.k_occurrence(x, 4)
    assert distances.dtype == torch.float32
    true = true_distances(x, x, "sqeuclidean")
    assert_exact(distances, indices, true, 4, True, torch.float32)
    assert torch.equal(counts.cpu(), torch.bincount(indices.cpu().reshape(-1), minlength=120))
