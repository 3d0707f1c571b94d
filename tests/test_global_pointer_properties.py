"""Property tests (hypothesis) for global_pointer_loss and global_pointer_decode against the float64
dense reference: shapes across the CPU kernel's 64 x 256 tiles, one and many types, the efficient
form, padding (whole samples too), tril and RoPE on and off, score scales up to the overflow path,
0 to many spans per row."""
import torch
from global_pointer_cases import BACKENDS, check_against_oracle, make_case
from hypothesis import given
from hypothesis import strategies as st
from oracle import F32, F64, PROPERTY_FLOORS, property_settings

import fastnotes
from fastnotes.global_pointer import global_pointer_scores


@st.composite
def gp_case(draw):
    backend = draw(st.sampled_from(BACKENDS))
    dtype = F32 if backend == "triton" else draw(st.sampled_from([F64, F32]))
    batch = draw(st.integers(1, 3))
    n = draw(st.sampled_from([1, 2, 13, 64, 65, 130]) if backend != "triton" else st.sampled_from([1, 5, 17]))
    heads = draw(st.sampled_from([1, 2, 7]))
    d = draw(st.sampled_from([2, 4, 10]))
    lengths = [draw(st.integers(0, n)) if draw(st.booleans()) else n for _ in range(batch)]
    if all(length == 0 for length in lengths):
        lengths[0] = n
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    tensors, kwargs = make_case(gen, batch, n, heads, d, efficient=draw(st.booleans()), lengths=lengths,
                                per_row=draw(st.sampled_from([0, 1, 6])), tril=draw(st.booleans()),
                                rope=draw(st.booleans()), scale=draw(st.sampled_from([0.3, 1.5, 6.0])))
    if kwargs["mask"] is None and draw(st.booleans()):  # an explicit all-True mask
        kwargs["mask"] = torch.ones(batch, n, dtype=torch.bool)
    return backend, dtype, tensors, kwargs, gen


@property_settings(25)
@given(gp_case())
def test_loss_and_gradients_match_the_reference(case):
    backend, dtype, tensors, kwargs, gen = case
    check_against_oracle(backend, tensors, kwargs, dtype, PROPERTY_FLOORS[dtype], gen)


@property_settings(15)
@given(gp_case(), st.sampled_from([0.0, 2.0, -1.0]))
def test_decode_matches_the_dense_scores(case, threshold):
    backend, _, tensors, kwargs, _ = case
    if backend == "triton":
        tensors = {name: t.float() for name, t in tensors.items()}
    opts = dict(mask=kwargs["mask"], rope=kwargs["rope"], tril=kwargs["tril"], type_bias=tensors.get("type_bias"))
    scores = global_pointer_scores(tensors["q"], tensors["k"], **opts)
    with fastnotes.use_backend(backend):
        got = fastnotes.global_pointer_decode(tensors["q"], tensors["k"], threshold=threshold, **opts)
    expected = (scores > threshold).nonzero()
    if backend == "triton":  # float32: compare away from the threshold
        near = ((scores - threshold).abs() < 1e-4).nonzero()
        got, expected = (rows[~(rows[:, None] == near[None]).all(-1).any(-1)] for rows in (got.cpu(), expected))
    assert torch.equal(got.cpu(), expected)
