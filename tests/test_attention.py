"""relpos_attention on every backend against the float64 reference, the spec oracles
(docs/attention.md, 'Worked examples'), gradcheck, determinism, masking edge cases, bad input, modules."""
import math
import threading

import pytest
import torch
from conftest import DEVICE, available_backends
from oracle import FLOORS, assert_close_to_oracle

import fastnotes
from fastnotes.reference import attention as reference

BACKENDS = available_backends()
F64 = torch.float64


@pytest.fixture(params=BACKENDS, ids=lambda b: b)
def backend(request):
    with fastnotes.use_backend(request.param):
        yield request.param


def backend_dtype(backend):
    return torch.float32 if backend == "triton" else F64


def op(q, k, v, **kwargs):
    return fastnotes.relpos_attention(q, k, v, **kwargs)


# ---- T5 buckets (spec 12b) --------------------------------------------------------------------------

BIDIRECTIONAL = {-200: 15, -128: 15, -20: 10, -16: 10, -15: 9, -8: 8, -7: 7, -1: 1,
                 0: 0, 1: 17, 7: 23, 8: 24, 15: 25, 16: 26, 20: 26, 127: 31, 200: 31}
CAUSAL = {0: 0, 5: 0, 300: 0, -1: 1, -7: 7, -8: 8, -15: 15, -16: 16, -20: 17, -127: 31, -128: 31, -1000: 31}


@pytest.mark.parametrize("bidirectional, table", [(True, BIDIRECTIONAL), (False, CAUSAL)])
def test_t5_bucket_table(bidirectional, table):
    rel = torch.tensor(list(table))
    got = fastnotes.t5_bucket(rel, 32, 128, bidirectional)
    assert got.dtype == torch.int64
    assert got.tolist() == list(table.values())


def test_t5_bucket_matches_the_formula_everywhere():
    """Every distance in [-1000, 1000] against the spec's scalar formula in plain Python."""
    def bucket(rel, nb=32, max_distance=128, bidirectional=True):
        ret = 0
        if bidirectional:
            nb //= 2
            ret += (rel > 0) * nb
            n = abs(rel)
        else:
            n = max(-rel, 0)
        max_exact = nb // 2
        if n < max_exact:
            return ret + n
        return ret + min(nb - 1, max_exact + math.floor(math.log(n / max_exact) / math.log(max_distance / max_exact)
                                                         * (nb - max_exact)))
    rel = torch.arange(-1000, 1001)
    for args in ((32, 128, True), (32, 128, False), (64, 128, True), (8, 20, False)):
        expected = [bucket(r, *args) for r in rel.tolist()]
        assert fastnotes.t5_bucket(rel, *args).tolist() == expected


# ---- probe oracles (spec 12a) -----------------------------------------------------------------------

N = 5
HALF = torch.tensor([0.5], dtype=F64)
POST_DELTA = torch.arange(-(N - 1), N, dtype=F64)[None]          # c_ij = i - j (width 2P + 1, P = N - 1)
T5_LINSPACE = torch.linspace(-1, 1, 32, dtype=F64)[None]
PROBES = [
    ("softmax causal", dict(causal=True), [1] * 5),
    ("softmax alibi", dict(alibi_slopes=HALF), [1] * 5),
    ("softmax t5", dict(rel_bias=T5_LINSPACE, rel_buckets=(32, 128, True)), [1] * 5),
    ("l2 causal", dict(causal=True, normalizer="l2"), [math.sqrt(i) for i in range(1, 6)]),
    ("l2 bidir", dict(normalizer="l2"), [2.23606798] * 5),
    ("l2 alibi", dict(alibi_slopes=HALF, normalizer="l2"), [1.86105671, 2.02319963, 2.08178726, 2.02319963, 1.86105671]),
    ("l2 t5", dict(rel_bias=T5_LINSPACE, rel_buckets=(32, 128, True), normalizer="l2"),
     [2.12162838, 2.03276973, 1.97576622, 1.99018099, 2.22683815]),
    ("urpe causal", dict(causal=True, post_table=POST_DELTA), [0, 0.5, 1, 1.5, 2]),
    ("urpe alibi", dict(alibi_slopes=HALF, post_table=POST_DELTA), [-1.09436663, -0.50111049, 0, 0.50111049, 1.09436663]),
]


@pytest.mark.parametrize("name, kwargs, expected", PROBES, ids=[p[0] for p in PROBES])
def test_probe_oracles(backend, name, kwargs, expected):
    dtype = backend_dtype(backend)
    q = torch.zeros(1, 1, N, 1, dtype=dtype, device=DEVICE)
    v = torch.ones(1, 1, N, 1, dtype=dtype, device=DEVICE)
    kwargs = {k: (t.to(dtype=dtype, device=DEVICE) if isinstance(t, torch.Tensor) else t) for k, t in kwargs.items()}
    out = op(q, q, v, **kwargs).flatten().double().cpu()
    assert torch.allclose(out, torch.tensor(expected, dtype=F64), atol=1e-8 if dtype == F64 else 2e-6, rtol=0)


# ---- the small case with gradients (spec 12c) -------------------------------------------------------

_I = torch.arange(4, dtype=F64)
SMALL_Q = torch.stack([torch.sin(_I + 1), torch.cos(2 * _I + 1)], -1)[None, None]
SMALL_K = torch.stack([torch.cos(_I + 0.5), torch.sin(3 * _I)], -1)[None, None]
SMALL_V = torch.stack([_I + 1, (_I - 1.5) ** 2, torch.sin(_I)], -1)[None, None]
SMALL_DO = torch.stack([torch.cos(_I), 0.1 * _I - 0.2, torch.ones(4, dtype=F64)], -1)[None, None]
BTAB = [0.3, -0.2, 0.1, 0.0, -0.1, 0.2, -0.3]
GTAB = [1.0, 0.8, 0.6, 0.4, 1.2, 1.4, 1.6]
SMALL = [
    ("softmax bidir", False, False, "softmax", {
        "o0": [2.13631836, 1.46514008, 0.36743788], "o3": [2.97228363, 1.26092801, 0.49064277],
        "dq0": [-0.70722926, 0.07320344], "dv0": [0.40607388, -0.11302519, 1.23546555],
        "dbias": [0.31421522, 0.24196079, 0.17484244, -0.98964618, -0.25012402, 0.36370435, 0.1450474]}),
    ("urpe bidir", False, True, "softmax", {
        "o0": [1.60661005, 0.89757362, 0.25192727], "dq0": [-0.7262494, 0.09452328], "dk0": [-0.49887209, -0.066422],
        "dv0": [0.10804357, -0.06866201, 1.26641021],
        "dbias": [0.42707048, 0.22604431, 0.02262908, -0.42969342, -0.27931049, -0.01004564, 0.04330568],
        "dpost": [0.78344537, 0.60324962, 0.95016756, -0.84599155, -0.35045158, -0.41421372, -0.07109138]}),
    ("urpe causal", True, True, "softmax", {
        "o": [[0.4, 0.9, 0.0], [1.05063137, 1.72910392, 0.12568937], [1.64267579, 1.45319529, 0.40211779],
              [2.38556166, 0.86691102, 0.58500998]],
        "dk0": [-0.0931566, 0.05978647], "dv0": [0.41195659, -0.14032048, 1.89434555],
        "dbias": [0, 0, 0, 0.23365396, -0.18258803, -0.0943716, 0.04330568],
        "dpost": [0, 0, 0, -0.31834453, -0.28856627, -0.45975895, -0.07109138]}),
    ("l2 bidir", False, False, "l2", {
        "o0": [3.93863251, 2.7012118, 0.67742841], "dq0": [-1.96263592, 0.15383765],
        "dbias": [0.82027261, 0.87836982, 0.47376496, -1.66276649, -1.08750854, 0.58589549, -0.00802785]}),
    ("l2 causal", True, False, "l2", {
        "o": [[1.0, 2.25, 0.0], [1.88291193, 2.06077439, 0.43078908], [3.15156926, 1.86730232, 0.85596135],
              [5.41576519, 2.29752301, 0.89399477]],
        "dk0": [-0.41715903, 0.43503502], "dbias": [0, 0, 0, 0.28011701, -0.60324662, 0.33115746, -0.00802785]}),
    ("l2 urpe causal", True, True, "l2", {
        "o3": [4.34670558, 1.579589, 1.06594023], "dq3": [-0.24190633, 0.28073728],
        "dv0": [0.26861432, -0.15598948, 2.71130759], "dpost": [0, 0, 0, -1.34031095, -0.6152517, -0.81622328, -0.12953482]}),
]


@pytest.mark.parametrize("name, causal, urpe, normalizer, expected", SMALL, ids=[s[0] for s in SMALL])
def test_small_case_oracles(backend, name, causal, urpe, normalizer, expected):
    dtype = backend_dtype(backend)
    leaf = lambda t: t.to(dtype=dtype, device=DEVICE).clone().requires_grad_()  # noqa: E731
    q, k, v = leaf(SMALL_Q), leaf(SMALL_K), leaf(SMALL_V)
    btab, gtab = leaf(torch.tensor([BTAB], dtype=F64)), leaf(torch.tensor([GTAB], dtype=F64))
    out = op(q, k, v, causal=causal, rel_bias=btab, post_table=gtab if urpe else None, normalizer=normalizer,
             scale=1 / math.sqrt(2))
    (out * SMALL_DO.to(out)).sum().backward()
    got = {"o": out[0, 0], "o0": out[0, 0, 0], "o3": out[0, 0, 3], "dq0": q.grad[0, 0, 0], "dq3": q.grad[0, 0, 3],
           "dk0": k.grad[0, 0, 0], "dv0": v.grad[0, 0, 0], "dbias": btab.grad[0], "dpost": gtab.grad[0] if urpe else None}
    tol = 1e-7 if dtype == F64 else 1e-5
    for key, value in expected.items():
        assert torch.allclose(got[key].detach().double().cpu(), torch.tensor(value, dtype=F64), atol=tol, rtol=0), key


# ---- random inputs against the float64 reference ----------------------------------------------------

def make_case(gen, batch, heads, kv_heads, lq, lk, dim, dim_v, *, bias="t5", urpe=True, padding=True):
    """Random q, k, v, tables and mask (float64, CPU) and the op's keyword arguments."""
    randn = lambda *s: torch.randn(*s, generator=gen, dtype=F64)  # noqa: E731
    tensors = {"q": randn(batch, heads, lq, dim), "k": randn(batch, kv_heads, lk, dim),
               "v": randn(batch, kv_heads, lk, dim_v)}
    kwargs = {}
    if bias == "t5":
        tensors["rel_bias"] = randn(heads, 16) * 0.5
        kwargs["rel_buckets"] = (16, 20, True)
    elif bias == "clip":
        tensors["rel_bias"] = randn(heads, 7) * 0.5
    elif bias == "alibi":
        tensors["alibi_slopes"] = torch.rand(heads, generator=gen, dtype=F64) * 0.5
    if urpe:
        width = 16 if bias == "t5" else 9
        tensors["post_table"] = torch.rand(heads, width, generator=gen, dtype=F64) * 2 - 0.5
    if padding:
        mask = torch.rand(batch, lk, generator=gen) < 0.8
        mask[:, 0] = True
        kwargs["key_padding_mask"] = mask
    return tensors, kwargs


def run_with_grads(fn, tensors, kwargs, upstream, dtype, device):
    leaves = {name: t.to(dtype=dtype, device=device).clone().requires_grad_() for name, t in tensors.items()}
    kwargs = {k: (t.to(device) if isinstance(t, torch.Tensor) else t) for k, t in kwargs.items()}
    out = fn(**leaves, **kwargs)
    out.backward(upstream.to(dtype=out.dtype, device=device))
    return {"out": out.detach().cpu(), **{f"d{name}": t.grad.cpu() for name, t in leaves.items()}}


def reference_fn(q, k, v, **kwargs):
    return reference.relpos_attention(q, k, v, **kwargs)


def op_fn(q, k, v, **kwargs):
    return fastnotes.relpos_attention(q, k, v, **kwargs)


def check_against_reference(backend, gen, *shape, dtype=None, causal=False, normalizer="softmax", **case):
    tensors, kwargs = make_case(gen, *shape, **case)
    kwargs.update(causal=causal, normalizer=normalizer)
    dtype = dtype or backend_dtype(backend)
    lq, dim_v = shape[3], shape[6]
    upstream = torch.randn(shape[0], shape[1], lq, dim_v, generator=gen, dtype=F64)
    exact = run_with_grads(reference_fn, tensors, kwargs, upstream, F64, "cpu")
    composite = run_with_grads(reference_fn, tensors, kwargs, upstream, dtype, "cpu")
    got = run_with_grads(op_fn, tensors, kwargs, upstream, dtype, DEVICE)
    floor = FLOORS[dtype]
    pairs = shape[0] * shape[3] * shape[4]  # what a table or slope gradient entry sums over, at most
    for name in exact:
        summed = pairs if name in ("drel_bias", "dpost_table", "dalibi_slopes") and dtype != F64 else 1
        assert_close_to_oracle(got[name], exact[name], composite[name], floor, f"{backend} {name}",
                               summed_terms=summed)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("normalizer", ["softmax", "l2"])
@pytest.mark.parametrize("bias", ["t5", "clip", "alibi"])
def test_against_reference(backend, rng, causal, normalizer, bias):
    # odd lengths with several tiles on the numba path (tiles of 64 x 128/256 queries x keys)
    shape = (2, 2, 2, 9, 9, 8, 8) if backend == "triton" else (2, 4, 2, 70, 300, 16, 5)
    check_against_reference(backend, rng, *shape, causal=causal, normalizer=normalizer, bias=bias)


@pytest.mark.parametrize("lq, lk", [(7, 13), (13, 7), (1, 5)])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_unequal_lengths_gqa_mqa(backend, rng, lq, lk, causal):
    check_against_reference(backend, rng, 1, 4, 1, lq, lk, 8, 4, causal=causal, normalizer="softmax", bias="t5")


def test_float32_numba_long(rng):
    with fastnotes.use_backend("numba"):
        check_against_reference("numba", rng, 1, 2, 1, 200, 333, 32, 32, dtype=torch.float32, causal=True,
                                normalizer="l2", bias="t5")


def test_numba_several_tiles_both_ways(rng):
    """More query and key rows than the forward's and backward's tiles, with tails (the shapes
    above fit in one query tile of the forward)."""
    from fastnotes.kernels.numba import attention as kernels
    lq = kernels.FORWARD_TILES[0] + kernels.BACKWARD_TILES[0] + 7
    lk = 2 * kernels.FORWARD_TILES[1] + 9
    with fastnotes.use_backend("numba"):
        check_against_reference("numba", rng, 1, 2, 1, lq, lk, 8, 4, dtype=torch.float32, causal=True,
                                normalizer="softmax", bias="t5")


@pytest.mark.skipif("numba" not in BACKENDS, reason="numba's forward tile choice")
def test_numba_forward_tile_sizes_agree(rng, monkeypatch):
    """The forward's small and large query tiles (chosen by the task count) both match the
    reference, over several tiles with tails; the choice follows the task count."""
    from fastnotes.kernels.numba import attention as kernels
    small, large = kernels.FORWARD_TILES, kernels.FORWARD_TILES_LARGE
    assert small[0] < large[0]
    assert kernels.forward_tiles(4, 8, 1024, 2) == large  # 128 tasks for 2 threads
    assert kernels.forward_tiles(1, 2, 300, 2) == small  # 4 tasks: each thread needs several
    lq, lk = large[0] + small[0] + 7, 2 * large[1] + 9
    monkeypatch.setattr(kernels, "SERIAL_FORWARD_WORK", 0)  # the parallel launch, which picks the tiles
    outs = []
    for per_thread, tiles in ((0, large), (1 << 30, small)):
        monkeypatch.setattr(kernels, "FORWARD_TASKS_PER_THREAD", per_thread)
        assert kernels.forward_tiles(1, 2, lq, 2) == tiles
        with fastnotes.use_backend("numba"):
            check_against_reference("numba", rng, 1, 2, 1, lq, lk, 8, 4, dtype=torch.float32, causal=True,
                                    normalizer="softmax", bias="t5")
            with torch.no_grad():
                tensors, kwargs = make_case(torch.Generator().manual_seed(5), 1, 2, 1, lq, lk, 8, 4)
                outs.append(op_fn(**{n: t.float() for n, t in tensors.items()}, causal=True, **kwargs))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif("numba" not in BACKENDS, reason="numba's serial forward for small calls")
@pytest.mark.parametrize("lq", [1, 70])
def test_numba_serial_forward_equals_parallel(rng, monkeypatch, lq):
    """Small calls (decoding) run the forward tasks on the calling thread: the same tasks, so the
    same bits as the parallel launch, and both against the reference."""
    from fastnotes.kernels.numba import attention as kernels
    outs = []
    for work in (0, 1 << 62):  # everything parallel, then everything serial (also checked below)
        monkeypatch.setattr(kernels, "SERIAL_FORWARD_WORK", work)
        with fastnotes.use_backend("numba"), torch.no_grad():
            tensors, kwargs = make_case(torch.Generator().manual_seed(lq), 2, 4, 2, lq, 300, 16, 8)
            tensors = {name: t.float() for name, t in tensors.items()}
            outs.append(op_fn(**tensors, causal=True, **kwargs))
    assert torch.equal(outs[0], outs[1])
    check_against_reference("numba", rng, 2, 4, 2, lq, 300, 16, 8, dtype=torch.float32, causal=True)


@pytest.mark.skipif("numba" not in BACKENDS, reason="numba's launcher for head-interleaved inputs")
@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "per-batch-element"])
def test_numba_head_interleaved_inputs(rng, monkeypatch, chunked):
    """q, k, v as an attention layer passes them ([B, L, H, D] projections seen as [B, H, L, D]):
    the launcher copies them (a batch element at a time above CHUNKED_COPY_BYTES) and returns out
    in q's layout; the same bits as contiguous inputs, forward and backward, with GQA and padding."""
    from fastnotes.kernels.numba import attention as kernels
    monkeypatch.setattr(kernels, "CHUNKED_COPY_BYTES", 0 if chunked else 1 << 62)
    monkeypatch.setattr(kernels, "SERIAL_FORWARD_WORK", 0)
    tensors, kwargs = make_case(rng, 3, 4, 2, 70, 90, 16, 8)
    kwargs["causal"] = True
    upstream = torch.randn(3, 4, 70, 8, generator=rng, dtype=F64)
    interleaved = lambda t: t.transpose(1, 2).contiguous().transpose(1, 2)  # noqa: E731
    runs = {}
    for layout in ("contiguous", "interleaved"):
        leaves = {n: (interleaved(t) if n in "qkv" and layout == "interleaved" else t).float().requires_grad_()
                  for n, t in tensors.items()}
        assert leaves["q"].is_contiguous() == (layout == "contiguous")
        with fastnotes.use_backend("numba"):
            out = op_fn(**leaves, **kwargs)
        assert out.transpose(1, 2).is_contiguous() == (layout == "interleaved")
        out.backward(upstream.float())
        runs[layout] = {"out": out.detach(), **{f"d{n}": t.grad for n, t in leaves.items()}}
    exact = run_with_grads(reference_fn, tensors, kwargs, upstream, F64, "cpu")
    composite = run_with_grads(reference_fn, tensors, kwargs, upstream, torch.float32, "cpu")
    for name, got in runs["interleaved"].items():
        assert torch.equal(got, runs["contiguous"][name]), name
        summed = 3 * 70 * 90 if name in ("drel_bias", "dpost_table") else 1
        assert_close_to_oracle(got, exact[name], composite[name], FLOORS[torch.float32], f"interleaved {name}",
                               summed_terms=summed)


@pytest.mark.skipif("numba" not in BACKENDS, reason="the single-query path sits in front of the numba kernels")
@pytest.mark.parametrize("normalizer, urpe", [("softmax", False), ("softmax", True), ("l2", False)])
@pytest.mark.parametrize("bias", ["t5", "clip", "alibi"])
def test_single_query_without_grad(rng, bias, normalizer, urpe):
    """Lq = 1 without autograd (decoding) runs in torch ops, not the kernel: against the float64
    reference and the kernel path (with grad), with GQA, padding and a fully padded row."""
    tensors, kwargs = make_case(rng, 3, 4, 2, 1, 37, 16, 8, bias=bias, urpe=urpe)
    kwargs["key_padding_mask"][2] = False
    kwargs.update(causal=True, normalizer=normalizer)
    exact = reference_fn(**tensors, **kwargs)
    composite = reference_fn(**{n: t.float() for n, t in tensors.items()}, **kwargs)
    with fastnotes.use_backend("numba"):
        with torch.no_grad():
            got = op_fn(**{n: t.float() for n, t in tensors.items()}, **kwargs)
        kernel = op_fn(**{n: t.float().requires_grad_() for n, t in tensors.items()}, **kwargs).detach()
    assert got.dtype == torch.float32 and torch.equal(got[2], torch.zeros_like(got[2]))
    assert_close_to_oracle(got, exact, composite, FLOORS[torch.float32], "single query")
    assert_close_to_oracle(kernel, exact, composite, FLOORS[torch.float32], "kernel, Lq = 1")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_numba(rng, dtype):
    tensors, kwargs = make_case(rng, 2, 2, 2, 20, 20, 8, 8)
    upstream = torch.randn(2, 2, 20, 8, generator=rng, dtype=F64)
    with fastnotes.use_backend("numba"):
        got = run_with_grads(op_fn, tensors, kwargs, upstream, dtype, "cpu")
    composite = run_with_grads(reference_fn, tensors, kwargs, upstream, dtype, "cpu")
    exact = run_with_grads(reference_fn, tensors, kwargs, upstream, F64, "cpu")
    assert got["out"].dtype == dtype and got["dq"].dtype == dtype and got["dpost_table"].dtype == dtype
    for name in exact:
        assert_close_to_oracle(got[name], exact[name], composite[name], FLOORS[dtype], name)


# ---- masking edge cases, determinism, gradcheck ---------------------------------------------------

@pytest.mark.parametrize("normalizer", ["softmax", "l2"])
def test_fully_masked_rows_give_zero(backend, normalizer):
    dtype = backend_dtype(backend)
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 6, 4, generator=gen, dtype=dtype).to(DEVICE).requires_grad_() for _ in range(3))
    mask = torch.ones(2, 6, dtype=torch.bool, device=DEVICE)
    mask[1] = False                                   # batch 1: every key padded
    table = torch.ones(2, 11, dtype=dtype, device=DEVICE, requires_grad=True)
    out = op(q, k, v, key_padding_mask=mask, post_table=table, normalizer=normalizer)
    out.sum().backward()
    assert torch.equal(out[1].detach().cpu(), torch.zeros(2, 6, 4, dtype=dtype))
    for t in (q, k, v, table):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[1].cpu(), torch.zeros(2, 6, 4, dtype=dtype))
    assert torch.equal(v.grad[1].cpu(), torch.zeros(2, 6, 4, dtype=dtype))
    # causal with Lq > Lk: the first Lq - Lk rows see no key
    q2 = torch.randn(1, 1, 5, 4, generator=gen, dtype=dtype).to(DEVICE)
    out2 = op(q2, k[:1, :1, :3].detach(), v[:1, :1, :3].detach(), causal=True, normalizer=normalizer)
    assert torch.equal(out2[0, 0, :2].cpu(), torch.zeros(2, 4, dtype=dtype))
    assert torch.isfinite(out2).all()


def test_backward_is_deterministic(backend, rng):
    shape = (1, 2, 1, 20, 33, 8, 8) if backend == "triton" else (2, 4, 2, 70, 150, 8, 8)
    tensors, kwargs = make_case(rng, *shape)
    upstream = torch.randn(*shape[:2], shape[3], shape[6], generator=rng, dtype=F64)
    dtype = torch.float32
    first = run_with_grads(op_fn, tensors, kwargs, upstream, dtype, DEVICE)
    second = run_with_grads(op_fn, tensors, kwargs, upstream, dtype, DEVICE)
    for name in first:
        assert torch.equal(first[name], second[name]), name


@pytest.mark.parametrize("backend_name", [b for b in BACKENDS if b != "triton"])
def test_gradcheck(backend_name):
    gen = torch.Generator().manual_seed(5)
    tensors, kwargs = make_case(gen, 1, 2, 1, 5, 7, 3, 2)
    names = list(tensors)
    inputs = tuple(tensors[n].clone().requires_grad_() for n in names)

    def fn(*args):
        return fastnotes.relpos_attention(**dict(zip(names, args)), **kwargs)

    with fastnotes.use_backend(backend_name):
        assert torch.autograd.gradcheck(fn, inputs)
        kwargs["causal"], kwargs["normalizer"] = True, "l2"
        assert torch.autograd.gradcheck(fn, inputs)


def test_non_contiguous_inputs(backend, rng):
    dtype = backend_dtype(backend)
    base = torch.randn(1, 6, 2, 8, generator=rng, dtype=dtype)          # [B, L, H, D] -> transpose
    q = k = v = base.transpose(1, 2).to(DEVICE)
    got = op(q, k, v, causal=True)
    exact = reference.relpos_attention(q.double().cpu(), k.double().cpu(), v.double().cpu(), causal=True)
    assert torch.allclose(got.double().cpu(), exact, atol=1e-5)


# ---- bad input ------------------------------------------------------------------------------------

def _good():
    return dict(q=torch.randn(1, 2, 4, 8), k=torch.randn(1, 2, 4, 8), v=torch.randn(1, 2, 4, 8))


@pytest.mark.parametrize("change, error, words", [
    (dict(q=torch.randn(2, 4, 8)), ValueError, "q must be 4-D"),
    (dict(q=torch.randint(0, 3, (1, 2, 4, 8))), TypeError, "q must have dtype"),
    (dict(k=torch.randn(1, 2, 4, 8, dtype=F64), v=torch.randn(1, 2, 4, 8, dtype=F64)), TypeError, "share a dtype"),
    (dict(k=torch.randn(1, 3, 4, 8), v=torch.randn(1, 3, 4, 8)), ValueError, "must divide"),
    (dict(k=torch.randn(1, 2, 4, 6)), ValueError, "head dim"),
    (dict(v=torch.randn(1, 2, 5, 8)), ValueError, "alike"),
    (dict(k=torch.randn(2, 2, 4, 8), v=torch.randn(2, 2, 4, 8)), ValueError, "batch"),
    (dict(q=torch.randn(1, 2, 0, 8)), ValueError, "empty"),
    (dict(causal=1), TypeError, "causal"),
    (dict(scale=float("nan")), ValueError, "scale"),
    (dict(normalizer="l1"), ValueError, "normalizer"),
    (dict(rel_bias=torch.randn(3, 7)), ValueError, "rel_bias must be [heads=2"),
    (dict(rel_bias=torch.randn(2, 6)), ValueError, "odd"),
    (dict(rel_bias=torch.randn(2, 7), rel_buckets=(32, 128, True)), ValueError, "num_buckets=32"),
    (dict(rel_buckets=(32, 128, True)), ValueError, "without rel_bias"),
    (dict(rel_bias=torch.randn(2, 32), rel_buckets=(32, 4, True)), ValueError, "max_distance"),
    (dict(rel_bias=torch.randn(2, 32), rel_buckets=(32, 128)), ValueError, "rel_buckets must be"),
    (dict(post_table=torch.randn(2, 7, 1)), ValueError, "post_table"),
    (dict(alibi_slopes=torch.randn(3)), ValueError, "alibi_slopes"),
    (dict(key_padding_mask=torch.ones(1, 4)), TypeError, "key_padding_mask"),
    (dict(key_padding_mask=torch.ones(1, 5, dtype=torch.bool)), ValueError, "key_padding_mask"),
])
def test_bad_input(change, error, words):
    args = {**_good(), **change}
    with pytest.raises(error, match=words.replace("[", r"\[")):
        fastnotes.relpos_attention(**args)


def test_t5_bucket_bad_input():
    with pytest.raises(TypeError, match="integer"):
        fastnotes.t5_bucket(torch.zeros(3))
    with pytest.raises(ValueError, match="num_buckets"):
        fastnotes.t5_bucket(torch.zeros(3, dtype=torch.int64), 3)


# ---- modules ----------------------------------------------------------------------------------------

def test_t5_relative_bias_module():
    module = fastnotes.T5RelativeBias(4, 32, 128)
    dense = module(5, 7)
    delta = reference.relative_distance(5, 7)
    assert dense.shape == (4, 5, 7)
    assert torch.equal(dense, module.table[:, fastnotes.t5_bucket(-delta)])


def test_self_attention_module():
    torch.manual_seed(0)
    x = torch.randn(2, 9, 16)
    plain = fastnotes.RelPosSelfAttention(16, 4, num_kv_heads=2)
    urpe = fastnotes.RelPosSelfAttention(16, 4, num_kv_heads=2, urpe=True, relative_bias=plain.relative_bias)
    urpe.load_state_dict(plain.state_dict(), strict=False)
    # URPE's table starts at 1: the same output as without it
    assert torch.allclose(plain(x), urpe(x), atol=1e-6)
    assert torch.equal(urpe.post_table, torch.ones(4, 32))
    # a table passed in is shared, and gets gradients from every layer that uses it
    shared = torch.nn.Parameter(torch.ones(4, 32))
    layers = [fastnotes.RelPosSelfAttention(16, 4, post_table=shared, relative_bias=plain.relative_bias)
              for _ in range(2)]
    out = layers[1](layers[0](x))
    assert layers[0].post_table is shared and layers[1].post_table is shared
    out.square().sum().backward()
    assert shared.grad is not None and shared.grad.abs().sum() > 0
    masked = fastnotes.RelPosSelfAttention(16, 4, position="alibi", normalizer="l2", causal=True, urpe=True)
    assert masked(x, key_padding_mask=torch.ones(2, 9, dtype=torch.bool)).shape == (2, 9, 16)


def test_forced_backend_reasons():
    q = torch.randn(1, 1, 4, 130)
    with fastnotes.use_backend("triton"), pytest.raises(fastnotes.BackendUnsupportedError, match="head dims up to 128"):
        fastnotes.relpos_attention(q, q, q)
    with fastnotes.use_backend("numba"), pytest.raises(fastnotes.BackendUnsupportedError, match="CPU"):
        fastnotes.relpos_attention(q.to("meta"), q.to("meta"), q.to("meta"))


# ---- double backward, autocast, concurrent calls ----------------------------------------------------

def test_double_backward(backend):
    """The fused backward is not differentiable: a gradient taken with create_graph=True must raise
    when differentiated again, never act as a constant. The reference path is a torch composite
    whose second derivative is exact: gradgradcheck."""
    gen = torch.Generator().manual_seed(11)
    tensors, kwargs = make_case(gen, 1, 2, 1, 4, 6, 3, 2)
    dtype = backend_dtype(backend)
    leaves = [t.to(dtype=dtype, device=DEVICE).requires_grad_() for t in tensors.values()]

    def fn(*args):
        return op(**dict(zip(tensors, args)), **kwargs)

    if backend == "reference":
        assert torch.autograd.gradgradcheck(fn, leaves)
        return
    # a loss linear in the output hands the backward a gradient with no graph: still tied to q
    for loss in (lambda o: o.sum(), lambda o: o.square().sum()):
        for i in (0, 3):  # q, and the bias table (its gradient comes through the diagonal vectors)
            g = torch.autograd.grad(loss(fn(*leaves)), leaves[i], create_graph=True)[0]
            with pytest.raises(RuntimeError, match="differentiated again"):
                g.square().sum().backward()


def _autocast_run(fn, tensors, kwargs, upstream):
    """fn under CPU autocast (bfloat16) on float32 leaves; backward outside autocast, as in training."""
    leaves = {name: t.float().requires_grad_() for name, t in tensors.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fn(**leaves, **kwargs)
    out.backward(upstream.to(out.dtype))
    return {"out": out.detach(), **{f"d{name}": t.grad for name, t in leaves.items()}}


@pytest.mark.parametrize("backend_name", [b for b in available_backends("cpu") if b != "triton"])
def test_cpu_autocast_bfloat16(backend_name, rng):
    """Under autocast the op runs in bfloat16 (as a matmul composite would: output bfloat16) with
    float32 accumulation; the gradients keep the leaves' dtype; values within bfloat16 rounding of
    the float64 oracle (at most 2x the autocast composite's error plus the bfloat16 floor, 2^-7, of
    the largest value).
    The Triton interpreter runs float32 only."""
    tensors, kwargs = make_case(rng, 2, 4, 2, 20, 33, 8, 8)
    kwargs["causal"] = True
    upstream = torch.randn(2, 4, 20, 8, generator=rng, dtype=F64)
    exact = run_with_grads(reference_fn, tensors, kwargs, upstream, F64, "cpu")
    composite = _autocast_run(reference_fn, tensors, kwargs, upstream)
    with fastnotes.use_backend(backend_name):
        got = _autocast_run(op_fn, tensors, kwargs, upstream)
    assert got["out"].dtype == torch.bfloat16
    for name in exact:
        if name != "out":
            assert got[name].dtype == torch.float32, name
        assert_close_to_oracle(got[name], exact[name], composite[name], FLOORS[torch.bfloat16],
                               f"autocast {name}")


def _blas_threads():
    from threadpoolctl import threadpool_info
    return sorted((info["filepath"], info["num_threads"]) for info in threadpool_info() if info["user_api"] == "blas")


@pytest.mark.skipif("numba" not in BACKENDS, reason="the numba kernels limit BLAS threads")
def test_concurrent_calls_restore_blas_threads():
    """The numba kernels limit BLAS to one thread while they run; calls from several Python threads
    at once must leave every BLAS library at its thread count afterwards (they once left it at 1,
    in most runs of this test; test_blas_limit_overlapping_out_of_order is the deterministic form)."""
    from threadpoolctl import ThreadpoolController
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, 2, 40, 8, generator=gen)
    start = threading.Barrier(4)

    def work():
        with fastnotes.use_backend("numba"):
            start.wait()
            for _ in range(40):
                x = q.clone().requires_grad_()
                op(x, x, x).sum().backward()

    with fastnotes.use_backend("numba"):
        op(q, q, q)  # loads the kernels, and with them scipy's BLAS, before the counts are taken
    blas = ThreadpoolController().select(user_api="blas")
    raised = blas.limit(limits=2) if all(n == 1 for _, n in _blas_threads()) else None  # else it cannot fail
    try:
        before = _blas_threads()
        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert _blas_threads() == before
    finally:
        if raised is not None:
            raised.restore_original_limits()


@pytest.mark.skipif("numba" not in BACKENDS, reason="the numba kernels limit BLAS threads")
def test_blas_limit_overlapping_out_of_order():
    """The interleaving that lost the thread count, made deterministic: a second launch starts
    while the first runs, and the first finishes first. BLAS stays at one thread until the last
    launch ends, then gets its count back."""
    from threadpoolctl import threadpool_limits

    from fastnotes.kernels.numba import attention as kernels
    with threadpool_limits(limits=3, user_api="blas"):
        before = _blas_threads()
        first, second = kernels.single_threaded_blas(), kernels.single_threaded_blas()
        first.__enter__()
        second.__enter__()
        first.__exit__(None, None, None)
        assert all(n == 1 for _, n in _blas_threads())
        second.__exit__(None, None, None)
        assert _blas_threads() == before


# ---- parameters off their defaults, paths the shapes above miss -------------------------------------

def test_off_default_parameters(backend, rng):
    """A scale that is not 1/sqrt(D), causal T5 buckets (bidirectional=False, small num_buckets and
    max_distance) with a URPE table on them, and several tiles with Lq != Lk on every backend (the
    Triton tiles are 16 x 16 under the interpreter: 20 x 35 is 2 x 3 tiles with tails), GQA and
    padding."""
    dtype = backend_dtype(backend)
    tensors, kwargs = make_case(rng, 1, 2, 1, 20, 35, 8, 4, bias="none", urpe=False)
    tensors["rel_bias"] = torch.randn(2, 8, generator=rng, dtype=F64)
    tensors["post_table"] = torch.rand(2, 8, generator=rng, dtype=F64) * 2 - 0.5
    kwargs.update(rel_buckets=(8, 12, False), scale=0.83, causal=True, normalizer="l2")
    upstream = torch.randn(1, 2, 20, 4, generator=rng, dtype=F64)
    exact = run_with_grads(reference_fn, tensors, kwargs, upstream, F64, "cpu")
    composite = run_with_grads(reference_fn, tensors, kwargs, upstream, dtype, "cpu")
    got = run_with_grads(op_fn, tensors, kwargs, upstream, dtype, DEVICE)
    floor = FLOORS[dtype]
    for name in exact:
        summed = 20 * 35 if name in ("drel_bias", "dpost_table") and dtype != F64 else 1
        assert_close_to_oracle(got[name], exact[name], composite[name], floor, f"{backend} {name}",
                               summed_terms=summed)


def test_alibi_slopes_values():
    """ALiBi's geometric slopes 2^(-8 (h + 1) / H) (Press et al.)."""
    assert torch.allclose(fastnotes.attention.alibi_slopes(8), torch.tensor([2.0 ** -(h + 1) for h in range(8)]))
    assert torch.allclose(fastnotes.attention.alibi_slopes(4), torch.tensor([2.0 ** -(2 * (h + 1)) for h in range(4)]))
