"""The Triton k-NN kernels (kernels/triton/hubness.py) against a float64 brute force, under
TRITON_INTERPRET=1 on CPU (or compiled on a GPU): metrics, self-exclusion by index, ties to the smaller
index, tiling, the spec's hand-checked oracles (specs/hubness.md section 9)."""
import pytest
import torch
from conftest import DEVICE

from fastnotes import _dispatch

if _dispatch.availability("triton", DEVICE) is not None:
    pytest.skip(f"triton: {_dispatch.availability('triton', DEVICE)}", allow_module_level=True)

from fastnotes.kernels.triton import hubness

METRICS = ["sqeuclidean", "cosine", "ip"]


def brute_force(x, reference, metric, exclude_self):
    """float64 distances [n, m] with the spec's conventions (self = +inf when excluded)."""
    q, r = x.double(), reference.double()
    if metric == "sqeuclidean":
        dist = (q[:, None, :] - r[None, :, :]).pow(2).sum(-1)
    elif metric == "cosine":
        qn, rn = q.norm(dim=1, keepdim=True), r.norm(dim=1, keepdim=True)
        sim = (q @ r.T) / (qn * rn.T)
        dist = 1 - torch.where((qn * rn.T) > 0, sim, torch.zeros_like(sim))
    else:
        dist = -(q @ r.T)
    if exclude_self:
        dist.fill_diagonal_(float("inf"))
    return dist


def oracle_knn(dist, k):
    """Rows sorted by (distance, index): a stable sort of index-ordered columns."""
    values, indices = torch.sort(dist, dim=1, stable=True)
    return values[:, :k], indices[:, :k]


def check_knn(distances, indices, dist, k, tol):
    """Exact (distance, index) order up to float32 near-ties: every returned distance matches the float64
    distance of its index and the oracle's k-th smallest; indices equal the oracle's except where two
    oracle distances lie within tol of each other (a near-tie fp32 may order either way)."""
    distances, indices = distances.cpu().double(), indices.cpu()
    want_d, want_i = oracle_knn(dist, k)
    assert indices.dtype == torch.int64 and distances.dtype == torch.float64
    torch.testing.assert_close(distances, dist.gather(1, indices), atol=tol, rtol=0)
    torch.testing.assert_close(distances, want_d, atol=tol, rtol=0)
    sorted_d, _ = torch.sort(dist, dim=1)
    gaps = (sorted_d[:, 1:k + 1] - sorted_d[:, :k]).abs().min(dim=1).values
    clear = gaps > 2 * tol
    assert clear.float().mean() > 0.5, "too many near-ties to test anything"
    assert torch.equal(indices[clear], want_i[clear])


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("exclude_self", [True, False])
def test_random_against_float64(metric, exclude_self, rng):
    x = torch.randn(40, 16, generator=rng)
    k = 3
    distances, indices = hubness.knn(x.to(DEVICE), x.to(DEVICE), k, metric, exclude_self)
    check_knn(distances, indices, brute_force(x, x, metric, exclude_self), k, tol=1e-4)
    if not exclude_self and metric != "ip":
        assert torch.equal(indices[:, 0].cpu(), torch.arange(40))  # self at distance ~0 (sqeuclidean, cosine)


@pytest.mark.parametrize("metric", METRICS)
def test_query_not_reference_and_tiles(metric, rng):
    """Several query blocks and reference tiles (odd sizes, tails) give the same keys as one tile."""
    x = torch.randn(37, 19, generator=rng).to(DEVICE)
    reference = torch.randn(45, 19, generator=rng).to(DEVICE)
    k = 5
    whole = hubness.knn_keys(x, reference, k, metric, False)
    tiled = hubness.knn_keys(x, reference, k, metric, False, tile_rows=16, tile_cols=13)
    assert torch.equal(whole, tiled)
    distances, indices = hubness.decode_keys(tiled)
    check_knn(distances, indices, brute_force(x.cpu(), reference.cpu(), metric, False), k, tol=1e-4)


@pytest.mark.parametrize("metric", ["sqeuclidean", "ip"])
def test_exact_ties_go_to_the_smaller_index(metric, rng):
    """Small-integer points: fp32 distances are exact, so there are many exact ties and the result must
    equal the float64 (distance, index) order exactly, across tiles and with self excluded by index
    (duplicates of a point stay legitimate neighbours at distance 0)."""
    x = torch.randint(-1, 2, (40, 3), generator=rng).float()
    k = 4
    for tile_rows, tile_cols in ((None, None), (16, 11)):
        keys = hubness.knn_keys(x.to(DEVICE), x.to(DEVICE), k, metric, True, tile_rows=tile_rows, tile_cols=tile_cols)
        distances, indices = hubness.decode_keys(keys)
        want_d, want_i = oracle_knn(brute_force(x, x, metric, True), k)
        assert torch.equal(indices.cpu(), want_i)
        assert torch.equal(distances.cpu().double(), want_d)


def test_sqeuclidean_distances_are_recomputed_directly(rng):
    """Far from the origin the expanded formula loses ~eps |q|^2 (here ~0.03): the returned distances
    are sums of squared differences, so a duplicate comes out at exactly 0, and rows stay sorted."""
    x = torch.randn(30, 16, generator=rng) + 100.0
    x[7] = x[3]
    distances, indices = hubness.knn(x.to(DEVICE), x.to(DEVICE), 4, "sqeuclidean", True)
    distances, indices = distances.cpu(), indices.cpu()
    assert indices[3, 0].item() == 7 and distances[3, 0].item() == 0.0
    assert indices[7, 0].item() == 3 and distances[7, 0].item() == 0.0
    exact = brute_force(x, x, "sqeuclidean", True).gather(1, indices)
    torch.testing.assert_close(distances.double(), exact, rtol=1e-5, atol=1e-5)
    assert (distances[:, 1:] >= distances[:, :-1]).all()


def test_keys_round_trip():
    distances = torch.tensor([[-float("inf"), -2.5, -0.0, 0.0, 1e-40, 3.0, float("inf"), float("nan")]])
    indices = torch.arange(8)[None, :]
    keys = hubness.encode_keys(distances, indices)
    assert torch.equal(keys, torch.sort(keys, dim=1).values)  # encoding keeps the order
    back_d, back_i = hubness.decode_keys(keys)
    assert torch.equal(back_i, indices)
    assert torch.equal(back_d[0, :7], torch.tensor([-float("inf"), -2.5, 0.0, 0.0, 1e-40, 3.0, float("inf")]))
    assert back_d[0, 7].item() == float("inf") and str(back_d[0, 2].item()) == "0.0"


def test_k_occurrence_counts_the_selected_indices(rng):
    x = torch.randn(33, 8, generator=rng).to(DEVICE)
    reference = torch.randn(21, 8, generator=rng).to(DEVICE)
    counts = hubness.k_occurrence(x, reference, 4, "sqeuclidean", False)
    _, indices = hubness.knn(x, reference, 4, "sqeuclidean", False)
    assert counts.dtype == torch.int64 and counts.shape == (21,)
    assert torch.equal(counts.cpu(), torch.bincount(indices.cpu().reshape(-1), minlength=21))
    assert counts.sum().item() == 33 * 4


def test_cosine_zero_vector_and_nan():
    """A zero vector has cosine distance 1 to everything; a NaN distance counts as +inf."""
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    distances, indices = hubness.knn(x.to(DEVICE), x.to(DEVICE), 3, "cosine", True)
    assert torch.equal(indices[0].cpu(), torch.tensor([1, 2, 3]))
    assert torch.equal(distances[0].cpu(), torch.ones(3))
    y = torch.tensor([[0.0, 0.0], [float("nan"), 0.0], [3.0, 0.0], [1.0, 1.0]])
    distances, indices = hubness.knn(y.to(DEVICE), y.to(DEVICE), 3, "sqeuclidean", True)
    assert torch.equal(indices[0].cpu(), torch.tensor([3, 2, 1]))
    assert distances[0, 2].item() == float("inf")
    assert torch.equal(indices[1].cpu(), torch.tensor([0, 2, 3]))  # all +inf: smaller index first


# ---- the spec's hand-checked oracles (section 9) --------------------------------------------------


def knn_indices(points, k, reference=None, exclude_self=True):
    x = torch.tensor(points, dtype=torch.float32).reshape(len(points), -1).to(DEVICE)
    r = x if reference is None else torch.tensor(reference, dtype=torch.float32).reshape(len(reference), -1).to(DEVICE)
    _, indices = hubness.knn(x, r, k, "sqeuclidean", exclude_self)
    counts = hubness.k_occurrence(x, r, k, "sqeuclidean", exclude_self)
    return indices.cpu().tolist(), counts.cpu().tolist()


def test_oracle_h_a():
    points = [0.0, 1.0, 3.0, 4.0, 10.0]
    assert knn_indices(points, 1) == ([[1], [0], [3], [2], [3]], [1, 1, 1, 2, 0])
    assert knn_indices(points, 2) == ([[1, 2], [0, 2], [3, 1], [2, 1], [3, 2]], [1, 3, 4, 2, 0])


def test_oracle_h_a2_star_with_ties():
    star = [(0, 0), (1, 0), (-1, 0), (0, 1), (0, -1), (5, 5)]
    assert knn_indices(star, 1) == ([[1], [0], [0], [0], [0], [1]], [4, 2, 0, 0, 0, 0])
    assert knn_indices(star, 2) == ([[1, 2], [0, 3], [0, 3], [0, 1], [0, 1], [1, 3]], [4, 4, 1, 3, 0, 0])


def test_oracle_h_b_h_c_h_d():
    assert knn_indices([0.0, 1.0, 2.0], 1) == ([[1], [0], [1]], [1, 2, 0])
    duplicates = [(0, 0), (0, 0), (5, 0)]
    assert knn_indices(duplicates, 1) == ([[1], [0], [0]], [2, 1, 0])
    assert knn_indices(duplicates, 2, exclude_self=False) == ([[0, 1], [0, 1], [2, 0]], [3, 2, 1])
    reference = [(0, 0), (1, 0), (0, 2), (3, 3)]
    queries = [(0.2, 0.1), (2.9, 2.5), (0.9, 0.4)]
    assert knn_indices(queries, 2, reference, exclude_self=False) == ([[0, 1], [3, 2], [1, 0]], [2, 2, 1, 1])
