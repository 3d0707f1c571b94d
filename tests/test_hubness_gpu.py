"""The cuda backend of hubness (kernels/cuda/hubness.py: Triton distance-key tile + the CUDA C++ top-k
merge and count kernels of fastnotes._C). On CPU: the custom ops' fake implementations (shapes, dtypes,
tracing). On a GPU (`gpu` tests): correctness against a float64 brute force and against torch
cdist + topk, exact ties, tiling, large k, adversarial insertion order, 16-bit inputs, opcheck,
torch.compile, and agreement with the Triton path key for key."""
import importlib.util

import pytest
import torch

pytest.importorskip("triton")

from fastnotes.kernels.cuda import hubness as cuda_hubness
from fastnotes.kernels.triton import hubness as triton_hubness
from test_hubness_triton import brute_force, check_knn, oracle_knn

METRICS = ["sqeuclidean", "cosine", "ip"]
HAS_EXTENSION = importlib.util.find_spec("fastnotes._C") is not None
needs_extension = pytest.mark.skipif(not HAS_EXTENSION, reason="fastnotes._C was not built")


# ---- fake tensors (run everywhere) -----------------------------------------------------------------


def test_fake_implementations_give_shapes_and_dtypes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(10, 4, device="cuda", dtype=torch.float16)
        reference = torch.empty(7, 4, device="cuda", dtype=torch.float16)
        distances, indices = cuda_hubness.knn(x, reference, 3, "sqeuclidean", False)
        counts = cuda_hubness.k_occurrence(x, reference, 3, "ip", False)
    assert distances.shape == (10, 3) and distances.dtype == torch.float32 and distances.device.type == "cuda"
    assert indices.shape == (10, 3) and indices.dtype == torch.int64
    assert counts.shape == (7,) and counts.dtype == torch.int64


def test_ops_trace_with_fake_tensors():
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(x):
        distances, _ = cuda_hubness.knn(x, x, 2, "cosine", True)
        return distances.sum(), cuda_hubness.k_occurrence(x, x, 2, "cosine", True)

    graph = make_fx(f, tracing_mode="fake")(torch.empty(6, 3))
    targets = {str(node.target) for node in graph.graph.nodes if node.op == "call_function"}
    assert {"fastnotes.hubness_knn.default", "fastnotes.hubness_k_occurrence.default"} <= targets


# ---- on a GPU -----------------------------------------------------------------------------------------


def cuda(t):
    return t.to("cuda")


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("exclude_self", [True, False])
@pytest.mark.parametrize("n, m, d", [(40, None, 16), (1000, None, 100), (777, 1531, 65)])
def test_cuda_knn_against_float64(metric, exclude_self, n, m, d, rng):
    x = torch.randn(n, d, generator=rng)
    reference = x if m is None else torch.randn(m, d, generator=rng)
    exclude_self = exclude_self and m is None
    k = 7
    xc = cuda(x)
    distances, indices = cuda_hubness.knn(xc, xc if m is None else cuda(reference), k, metric, exclude_self)
    check_knn(distances, indices, brute_force(x, reference, metric, exclude_self), k, tol=1e-4 * d ** 0.5)
    t_distances, t_indices = triton_hubness.knn(xc, xc if m is None else cuda(reference), k, metric, exclude_self)
    assert torch.equal(indices, t_indices) and torch.equal(distances, t_distances)  # same keys, same merge order


@pytest.mark.gpu
@needs_extension
def test_against_torch_cdist_topk(rng):
    """Figures for the issue: agreement with the composite users write (float32 cdist + topk)."""
    x = cuda(torch.randn(4096, 128, generator=rng))
    k = 10
    distances, indices = cuda_hubness.knn(x, x, k, "sqeuclidean", True)
    dist = torch.cdist(x, x).pow(2)
    dist.fill_diagonal_(float("inf"))
    want_d, want_i = torch.topk(dist, k, dim=1, largest=False)
    torch.testing.assert_close(distances, want_d, atol=2e-3, rtol=1e-5)
    same = (indices.sort(1).values == want_i.sort(1).values).all(1).float().mean().item()
    assert same > 0.99, f"only {same:.4f} of rows have the same neighbour set as cdist + topk"
    counts = cuda_hubness.k_occurrence(x, x, k, "sqeuclidean", True)
    assert torch.equal(counts, torch.bincount(indices.reshape(-1), minlength=4096))


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("metric", ["sqeuclidean", "ip"])
def test_cuda_exact_ties_and_tiles(metric, rng):
    x = torch.randint(-1, 2, (300, 3), generator=rng).float()
    k = 9
    want_d, want_i = oracle_knn(brute_force(x, x, metric, True), k)
    for tile_rows, tile_cols in ((None, None), (64, 37), (1, 299)):
        keys, *_ = cuda_hubness._knn_keys(cuda(x), cuda(x), k, metric, True, tile_rows=tile_rows, tile_cols=tile_cols)
        distances, indices = triton_hubness.decode_keys(keys)
        assert torch.equal(indices.cpu(), want_i), (tile_rows, tile_cols)
        assert torch.equal(distances.cpu().double(), want_d)


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("k", [1, 31, 33, 64, 100, 1024])
def test_large_k_and_adversarial_order(k, rng):
    """References in decreasing distance from every query: each candidate enters the running top-k
    (the insertion path of the merge, with shifts across several 32-slot chunks)."""
    m = 3000
    reference = torch.arange(m, 0, -1, dtype=torch.float32)[:, None] * torch.ones(1, 4)
    x = torch.zeros(5, 4) - torch.rand(5, 1, generator=rng)
    distances, indices = cuda_hubness.knn(cuda(x), cuda(reference), k, "sqeuclidean", False)
    want_d, want_i = oracle_knn(brute_force(x, reference, "sqeuclidean", False), k)
    assert torch.equal(indices.cpu(), want_i)
    torch.testing.assert_close(distances.cpu().double(), want_d, rtol=1e-5, atol=0)


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_accumulate_in_float32(dtype, rng):
    x = torch.randn(500, 64, generator=rng).to(dtype)
    distances, indices = cuda_hubness.knn(cuda(x), cuda(x), 5, "sqeuclidean", True)
    assert distances.dtype == torch.float32
    check_knn(distances, indices, brute_force(x.float(), x.float(), "sqeuclidean", True), 5, tol=1e-3)


@pytest.mark.gpu
@needs_extension
def test_spec_oracles_on_cuda():
    star = cuda(torch.tensor([(0, 0), (1, 0), (-1, 0), (0, 1), (0, -1), (5, 5)], dtype=torch.float32))
    _, indices = cuda_hubness.knn(star, star, 2, "sqeuclidean", True)
    assert indices.cpu().tolist() == [[1, 2], [0, 3], [0, 3], [0, 1], [0, 1], [1, 3]]
    assert cuda_hubness.k_occurrence(star, star, 2, "sqeuclidean", True).cpu().tolist() == [4, 4, 1, 3, 0, 0]
    duplicates = cuda(torch.tensor([(0, 0), (0, 0), (5, 0)], dtype=torch.float32))
    assert cuda_hubness.k_occurrence(duplicates, duplicates, 1, "sqeuclidean", True).cpu().tolist() == [2, 1, 0]
    assert cuda_hubness.k_occurrence(duplicates, duplicates, 2, "sqeuclidean", False).cpu().tolist() == [3, 2, 1]


@pytest.mark.gpu
@needs_extension
def test_side_stream_and_counts(rng):
    x = cuda(torch.randn(2000, 32, generator=rng))
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        counts = cuda_hubness.k_occurrence(x, x, 5, "sqeuclidean", True)
    stream.synchronize()
    _, indices = triton_hubness.knn(x, x, 5, "sqeuclidean", True)
    assert torch.equal(counts, torch.bincount(indices.reshape(-1), minlength=2000))
    assert counts.sum().item() == 2000 * 5


@pytest.mark.gpu
@needs_extension
def test_opcheck_and_compile(rng):
    x = cuda(torch.randn(64, 8, generator=rng))
    reference = cuda(torch.randn(50, 8, generator=rng))
    for op in (torch.ops.fastnotes.hubness_knn.default, torch.ops.fastnotes.hubness_k_occurrence.default):
        torch.library.opcheck(op, (x, reference, 3, "sqeuclidean", False))

    @torch.compile(fullgraph=True)
    def counts(x, reference):
        return cuda_hubness.k_occurrence(x, reference, 3, "sqeuclidean", False) * 2

    assert torch.equal(counts(x, reference), 2 * cuda_hubness.k_occurrence(x, reference, 3, "sqeuclidean", False))


def test_k_above_the_shared_memory_limit_is_refused():
    with pytest.raises(ValueError, match="k must be in 1..1024"):
        cuda_hubness._check_k(cuda_hubness.MAX_K + 1)
