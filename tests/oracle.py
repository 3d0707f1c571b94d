"""The package's tolerance rule (DESIGN.md), shared by every family's tests.

A kernel's error against the float64 oracle may be at most twice the error of the same-dtype
plain-torch composite (the reference path run in the kernel's dtype), plus a floor relative to the
result's size:

    max |got - exact| <= 2 max |composite - exact| + floor * max(1, max |exact|)

The composite's error measures how hard the case is; the floor covers cases where the composite is
right by luck. The options of assert_close_to_oracle add the allowances some results need (sums
whose order differs, sums whose terms cancel, non-finite values).
"""
import torch
from hypothesis import HealthCheck, settings

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
EPS32 = torch.finfo(F32).eps

# The floor, relative to max(1, max |exact|), per dtype the op computes in (bfloat16 autocast too):
# one or two epsilons of float16 / bfloat16, ~17 of float32, ~4500 of float64.
FLOORS = {F64: 1e-12, F32: 2e-6, F16: 2e-3, BF16: 2 ** -7}

# Per-family overrides, where a family's tests need another floor than FLOORS.
# hypothesis cases (zlpr, attention): extreme logits and biases on the float32 paths
PROPERTY_FLOORS = {**FLOORS, F32: 1e-5}
# expected_accuracy: a Gauss-Hermite quadrature sum over nodes and classes per row, in float64 too
EXACT_FLOORS = {**FLOORS, F64: 1e-10, F32: 3e-6}
# sampler_step: float32 steps take coefficients rounded from the float64 schedule
DIFFUSION_FLOORS = {**FLOORS, F32: 3e-6}
# ladder_merge: tighter in float32 (a short matmul and one blend per output) and for bfloat16
# inputs (not under autocast, which keeps FLOORS)
LST_FLOORS = {**FLOORS, F32: 1e-6, BF16: 2 ** -8}


def _max(t):
    return t.max().item() if t.numel() else 0.0


def assert_close_to_oracle(got, exact, composite, floor, what, *, summed_terms=1, terms=0.0,
                           roundoff=4 * EPS32, entrywise=False, same_nonfinite=False):
    """The package rule, with the allowances some results need:

    bound = 2 * max |composite - exact| + floor * scale
            + roundoff * sqrt(summed_terms) * scale   (only when summed_terms > 1)
            + roundoff * terms

    scale: max(1, max |exact|); with entrywise=True, max(1, |exact|) per entry (tighter).
    summed_terms: how many contributions an entry sums (a table gradient over every query-key pair):
        two summation orders differ by about sqrt(summed_terms) roundoffs of the result's size.
    terms: the summed size of what a result adds up when those terms cancel (scalar or per entry):
        summation orders differ by a few roundoffs of that size, not of the (small) result.
    roundoff: the unit of those two allowances (default 4 float32 epsilons).
    same_nonfinite: where the oracle is NaN or infinite, got must have the same NaN / infinity; the
        rule applies to the entries where the oracle is finite (and the composite's error where it
        is finite too). Otherwise every entry of got must be finite."""
    got = got.detach().cpu().double()
    exact = exact.detach().cpu().double()
    composite = composite.detach().cpu().double()
    if same_nonfinite:
        assert torch.equal(got.isnan(), exact.isnan()), f"{what}: NaN differs from the oracle's"
        infinite = exact.isinf()
        assert torch.equal(got[infinite], exact[infinite]), f"{what}: infinities differ"
        finite = torch.isfinite(exact)
        got, exact, composite = got[finite], exact[finite], composite[finite]
        if torch.is_tensor(terms) and terms.dim():
            terms = terms.expand(finite.shape)[finite]
        composite_err = (composite - exact).abs().nan_to_num(0.0, 0.0, 0.0)
    else:
        assert torch.isfinite(got).all(), f"{what}: non-finite values"
        composite_err = (composite - exact).abs()
    err = (got - exact).abs()
    scale = exact.abs().clamp(min=1.0) if entrywise else max(1.0, _max(exact.abs()))
    bound = 2 * _max(composite_err) + floor * scale + roundoff * terms
    if summed_terms > 1:
        bound = bound + roundoff * summed_terms ** 0.5 * scale
    bound = torch.as_tensor(bound, dtype=F64).expand(err.shape)
    excess = err - bound
    if excess.numel() and not (excess <= 0).all():
        worst = excess.argmax()
        raise AssertionError(f"{what}: error {err.flatten()[worst]:.3g} > bound {bound.flatten()[worst]:.3g} "
                             f"(composite error {_max(composite_err):.3g})")


def property_settings(max_examples=25):
    """The hypothesis settings of the property tests: a bounded budget, no deadline (the first call
    compiles kernels), no saved examples; the draws follow the profile tests/conftest.py loads."""
    return settings(max_examples=max_examples, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
