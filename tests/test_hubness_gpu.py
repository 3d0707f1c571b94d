"""The cuda backend of hubness (kernels/cuda/hubness.py: Triton value-key tile + the CUDA C++ top-k
merge and count kernels of fastnotes._C). On CPU: the custom ops' fake implementations (shapes, dtypes,
tracing). On a GPU (`gpu` tests): exact lists against the float64 oracle (offset data included), exact
ties across tilings, large k, adversarial insertion order, 16-bit inputs, opcheck, torch.compile."""
import importlib.util

import pytest
import torch

pytest.importorskip("triton")

import fastnotes
from fastnotes import hubness
from fastnotes.kernels.cuda import hubness as cuda_hubness
from fastnotes.kernels.triton import hubness as triton_hubness
from hubness_cases import assert_exact, true_distances

METRICS = ["sqeuclidean", "cosine", "ip"]
HAS_EXTENSION = importlib.util.find_spec("fastnotes._C") is not None
needs_extension = pytest.mark.skipif(not HAS_EXTENSION, reason="fastnotes._C was not built")


# ---- fake tensors (run everywhere) -----------------------------------------------------------------


def test_fake_implementations_give_shapes_and_dtypes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(10, 4, device="cuda")
        reference = torch.empty(7, 4, device="cuda")
        values, indices = cuda_hubness.candidates(x, reference, torch.empty(7, device="cuda"), -2.0, 3, False)
        counts = cuda_hubness.count(indices, 7)
    assert values.shape == (10, 3) and values.dtype == torch.float32 and values.device.type == "cuda"
    assert indices.shape == (10, 3) and indices.dtype == torch.int64
    assert counts.shape == (7,) and counts.dtype == torch.int64


def test_ops_trace_with_fake_tensors():
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(x, add):
        values, indices = cuda_hubness.candidates(x, x, add, -1.0, 2, True)
        return values.sum(), cuda_hubness.count(indices, 6)

    graph = make_fx(f, tracing_mode="fake")(torch.empty(6, 3), torch.empty(6))
    targets = {str(node.target) for node in graph.graph.nodes if node.op == "call_function"}
    assert {"fastnotes.hubness_candidates.default", "fastnotes.hubness_count.default"} <= targets


def test_k_above_the_shared_memory_limit_is_refused():
    with pytest.raises(ValueError, match="k must be in 1..1024"):
        cuda_hubness._check_k(cuda_hubness.MAX_K + 1)


# ---- on a GPU -----------------------------------------------------------------------------------------


def cuda(t):
    return t.to("cuda")


@pytest.fixture
def on_cuda():
    with fastnotes.use_backend("cuda"):
        yield


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("exclude_self", [True, False])
@pytest.mark.parametrize("n, m, d, offset", [(40, None, 16, 0.0), (1000, None, 100, 0.0), (777, 1531, 65, 0.0),
                                             (2000, None, 16, 100.0)])
def test_cuda_knn_against_float64(on_cuda, metric, exclude_self, n, m, d, offset, rng):
    x = offset + torch.randn(n, d, generator=rng) * (0.1 if offset else 1.0)
    reference = None if m is None else offset + torch.randn(m, d, generator=rng)
    k = 7
    distances, indices = hubness.knn(cuda(x), k, reference=None if m is None else cuda(reference), metric=metric,
                                     exclude_self=exclude_self)
    true = true_distances(x, x if m is None else reference, metric)
    assert_exact(distances, indices, true, k, exclude_self and m is None, torch.float32)
    counts = hubness.k_occurrence(cuda(x), k, reference=None if m is None else cuda(reference), metric=metric,
                                  exclude_self=exclude_self)
    assert torch.equal(counts.cpu(), torch.bincount(indices.cpu().reshape(-1), minlength=true.shape[1]))


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("scale", [-2.0, -1.0])
def test_cuda_exact_ties_and_tiles(scale, rng):
    x = cuda(torch.randint(-1, 2, (300, 3), generator=rng).float())
    add = (x ** 2).sum(1) if scale == -2.0 else torch.zeros(300, device="cuda")
    v = add.double()[None, :] + scale * (x.double() @ x.double().T)
    v.fill_diagonal_(float("inf"))
    want_v, want_i = torch.sort(v.cpu(), dim=1, stable=True)
    for tiles in ({}, {"tile_rows": 64, "tile_cols": 37}, {"tile_rows": 1, "tile_cols": 299}):
        keys = cuda_hubness.knn_keys(x, x, add, scale, 9, True, **tiles)
        values, indices = triton_hubness.decode_keys(keys)
        assert torch.equal(indices.cpu(), want_i[:, :9]), tiles
        assert torch.equal(values.cpu().double(), want_v[:, :9])


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("k", [1, 31, 33, 64, 100, 1016])
def test_large_k_and_adversarial_order(on_cuda, k, rng):
    """References in decreasing distance from every query: each candidate enters the running top-k
    (the insertion path of the merge, with shifts across several 32-slot chunks)."""
    m = 3000
    reference = torch.arange(m, 0, -1, dtype=torch.float32)[:, None] * torch.ones(1, 4)
    x = torch.zeros(5, 4) - torch.rand(5, 1, generator=rng)
    distances, indices = hubness.knn(cuda(x), k, reference=cuda(reference))
    assert_exact(distances, indices, true_distances(x, reference, "sqeuclidean"), k, False, torch.float32)
    with pytest.raises(fastnotes.BackendUnsupportedError, match="cuda keeps k <= 1016"):
        hubness.knn(cuda(x), 1017, reference=cuda(reference))


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(on_cuda, dtype, rng):
    x = (3 + torch.randn(500, 64, generator=rng)).to(dtype)
    distances, indices = hubness.knn(cuda(x), 5)
    assert_exact(distances, indices, true_distances(x, x, "sqeuclidean"), 5, True, torch.float32)


@pytest.mark.gpu
@needs_extension
def test_spec_oracles_on_cuda(on_cuda):
    star = cuda(torch.tensor([(0, 0), (1, 0), (-1, 0), (0, 1), (0, -1), (5, 5)], dtype=torch.float32))
    _, indices = hubness.knn(star, 2)
    assert indices.cpu().tolist() == [[1, 2], [0, 3], [0, 3], [0, 1], [0, 1], [1, 3]]
    assert hubness.k_occurrence(star, 2).cpu().tolist() == [4, 4, 1, 3, 0, 0]
    duplicates = cuda(torch.tensor([(0, 0), (0, 0), (5, 0)], dtype=torch.float32))
    assert hubness.k_occurrence(duplicates, 1).cpu().tolist() == [2, 1, 0]
    assert hubness.k_occurrence(duplicates, 2, exclude_self=False).cpu().tolist() == [3, 2, 1]


@pytest.mark.gpu
@needs_extension
def test_side_stream_and_counts(on_cuda, rng):
    x = cuda(torch.randn(2000, 32, generator=rng))
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        counts = hubness.k_occurrence(x, 5)
    stream.synchronize()
    _, indices = hubness.knn(x, 5)
    assert torch.equal(counts, torch.bincount(indices.reshape(-1), minlength=2000))
    assert counts.sum().item() == 2000 * 5


@pytest.mark.gpu
@needs_extension
def test_opcheck_and_compile(rng):
    x = cuda(torch.randn(64, 8, generator=rng))
    reference = cuda(torch.randn(50, 8, generator=rng))
    add = (reference ** 2).sum(1)
    torch.library.opcheck(torch.ops.fastnotes.hubness_candidates.default, (x, reference, add, -2.0, 3, False))
    indices = cuda(torch.randint(0, 50, (64, 3), generator=rng))
    torch.library.opcheck(torch.ops.fastnotes.hubness_count.default, (indices, 50))

    @torch.compile(fullgraph=True)
    def counts(indices):
        return cuda_hubness.count(indices, 50) * 2

    assert torch.equal(counts(indices), 2 * torch.bincount(indices.reshape(-1), minlength=50))
