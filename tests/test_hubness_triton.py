"""The Triton candidate kernel (kernels/triton/hubness.py) under TRITON_INTERPRET=1 on CPU (or compiled
on a GPU): values v = add_j + scale <x_i, y_j> against float64, the (value, index) key order, exclusion
by index, empty slots, tiling. The exact lists through fastnotes.hubness on this backend are tested in
tests/test_hubness.py (the hub_backend fixture includes triton)."""
import pytest
import torch
from conftest import DEVICE

from fastnotes import _dispatch

if _dispatch.availability("triton", DEVICE) is not None:
    pytest.skip(f"triton: {_dispatch.availability('triton', DEVICE)}", allow_module_level=True)

from fastnotes.kernels.triton import hubness

TILINGS = [{}, {"tile_rows": 16, "tile_cols": 13}]  # one tile; several with tails


def oracle_values(x, reference, add, scale, exclude_self):
    """float64 [n, m] values of the kernel's formula (self = +inf when excluded)."""
    v = add.double()[None, :] + scale * (x.double() @ reference.double().T)
    if exclude_self:
        v.fill_diagonal_(float("inf"))
    return v


def check_candidates(values, indices, v, k):
    """Each row holds the k smallest values of v up to float32 rounding of the dot products (BLAS
    kernels round differently, OPENBLAS_CORETYPE included), with its indices; the order is exact
    where no two oracle values are within that rounding."""
    values, indices = values.cpu().double(), indices.cpu()
    want_v, want_i = torch.sort(v, dim=1, stable=True)
    tol = 1e-5 * (1 + v[torch.isfinite(v)].abs().max())
    torch.testing.assert_close(values, v.gather(1, indices), atol=tol, rtol=0)
    torch.testing.assert_close(values, want_v[:, :k], atol=tol, rtol=0)
    clear = (want_v[:, 1:k + 1] - want_v[:, :k]).min(dim=1).values > 2 * tol
    assert clear.float().mean() > 0.5, "too many near-ties to test anything"
    assert torch.equal(indices[clear], want_i[clear, :k])
    assert bool((values[:, 1:] >= values[:, :-1]).all())


@pytest.mark.parametrize("scale", [-2.0, -1.0])
@pytest.mark.parametrize("exclude_self", [True, False])
def test_one_set_against_float64(scale, exclude_self, rng):
    x = torch.randn(40, 16, generator=rng)
    add = torch.randn(40, generator=rng)
    values, indices = hubness.candidates(x.to(DEVICE), x.to(DEVICE), add.to(DEVICE), scale, 3, exclude_self)
    check_candidates(values, indices, oracle_values(x, x, add, scale, exclude_self), 3)


@pytest.mark.parametrize("tiles", TILINGS, ids=["one-tile", "tiles"])
def test_query_not_reference_and_tiles(tiles, rng):
    """Several query blocks and reference tiles (odd sizes, tails) against float64: every tiling is
    checked with a tolerance (never against another tiling bit for bit: BLAS rounding depends on the
    position of a row in its block and on the machine)."""
    x = torch.randn(37, 19, generator=rng)
    reference = torch.randn(45, 19, generator=rng)
    add = (reference ** 2).sum(1)
    values, indices = hubness.candidates(x.to(DEVICE), reference.to(DEVICE), add.to(DEVICE), -2.0, 5, False, **tiles)
    check_candidates(values, indices, oracle_values(x, reference, add, -2.0, False), 5)


@pytest.mark.parametrize("tiles", TILINGS, ids=["one-tile", "tiles"])
@pytest.mark.parametrize("scale", [-2.0, -1.0])
def test_exact_ties_go_to_the_smaller_index(tiles, scale, rng):
    """Small integers: every value is exact in float32 (negative ones and zeros included), so there
    are many exact ties and the keys must give the float64 (value, index) order exactly, across tiles
    and with self excluded by index (duplicates stay candidates)."""
    x = torch.randint(-1, 2, (40, 3), generator=rng).float()
    add = (x ** 2).sum(1) if scale == -2.0 else torch.zeros(40)
    values, indices = hubness.candidates(x.to(DEVICE), x.to(DEVICE), add.to(DEVICE), scale, 4, True, **tiles)
    want_v, want_i = torch.sort(oracle_values(x, x, add, scale, True), dim=1, stable=True)
    assert torch.equal(indices.cpu(), want_i[:, :4])
    assert torch.equal(values.cpu().double(), want_v[:, :4])


def test_infinite_and_nan_values_rank_last_by_index():
    """add = +inf (how cosine ranks zero rows) and NaN both rank as +inf, ties by index; slots no
    reference can fill (k above the references left) decode to (NaN, 2^32 - 1)."""
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0]])
    add = torch.tensor([float("inf"), 0.0, float("nan"), 0.0])
    values, indices = hubness.candidates(x.to(DEVICE), x.to(DEVICE), add.to(DEVICE), -1.0, 3, True)
    assert indices[0].tolist() == [3, 1, 2]  # v = -2, 0, then +inf (NaN) before +inf at a larger index
    assert values[0].tolist() == [-2.0, 0.0, float("inf")]
    values, indices = hubness.candidates(x[:2].to(DEVICE), x[:3].to(DEVICE), add[:3].to(DEVICE), -1.0, 4, False)
    assert indices[:, 3].tolist() == [2**32 - 1] * 2 and bool(values[:, 3].isnan().all())
