"""Inputs and the oracle comparison shared by the global_pointer tests (test_global_pointer.py and
test_global_pointer_properties.py)."""
import torch
from conftest import DEVICE, available_backends
from oracle import F64, assert_close_to_oracle

import fastnotes
from fastnotes import _registry
from fastnotes.reference import global_pointer as reference

# The backends this family has here (triton joins once its kernel module is registered).
BACKENDS = [b for b in available_backends() if b == "reference" or b in _registry.GLOBAL_POINTER.backends]


def random_spans(gen, lengths, heads, per_row, tril=True, diagonal=False):
    """Distinct (start, end) pairs inside each sample's length, padded with -1 ([B, H, per_row, 2]);
    a random count per row (0 included). diagonal: one-token spans (i, i) only."""
    spans = torch.full((len(lengths), heads, per_row, 2), -1, dtype=torch.int64)
    for b, length in enumerate(lengths):
        for h in range(heads):
            count = int(torch.randint(0, per_row + 1, (1,), generator=gen)) if length else 0
            pairs = set()
            for _ in range(count):
                i = int(torch.randint(0, length, (1,), generator=gen))
                j = i if diagonal else int(torch.randint(i if tril else 0, length, (1,), generator=gen))
                pairs.add((i, j))
            for p, pair in enumerate(sorted(pairs)):
                spans[b, h, p] = torch.tensor(pair)
    return spans


def make_case(gen, batch, n, heads, d, *, efficient=False, type_bias=False, lengths=None, per_row=4, tril=True,
              rope=True, diagonal=False, scale=1.5):
    """(tensors {q, k[, type_bias]} in float64, kwargs {spans, mask, tril, rope}); efficient: q, k
    [B, n, d] shared with a type_bias; type_bias: per-type q, k [B, n, H, d] with a type_bias too."""
    lengths = [n] * batch if lengths is None else lengths
    shape = (batch, n, d) if efficient else (batch, n, heads, d)
    tensors = {name: torch.randn(shape, generator=gen, dtype=F64) * scale for name in ("q", "k")}
    if efficient or type_bias:
        tensors["type_bias"] = torch.randn(batch, n, heads, 2, generator=gen, dtype=F64)
    mask = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]
    kwargs = dict(spans=random_spans(gen, lengths, heads, per_row, tril, diagonal),
                  mask=None if all(length == n for length in lengths) else mask, tril=tril, rope=rope)
    return tensors, kwargs


def run(tensors, kwargs, upstream, dtype, device=DEVICE):
    """Per-row losses [B, H] and the gradients {name: grad} of the op on leaves cast to dtype."""
    leaves = {name: t.to(device=device, dtype=dtype, copy=True).requires_grad_() for name, t in tensors.items()}
    moved = {name: v.to(device) if isinstance(v, torch.Tensor) else v for name, v in kwargs.items()}
    loss = fastnotes.global_pointer_loss(leaves["q"], leaves["k"], moved.pop("spans"), type_bias=leaves.get("type_bias"),
                                         reduction="none", **moved)
    loss.backward(upstream.to(device=device, dtype=loss.dtype))
    return loss.detach(), {name: leaf.grad for name, leaf in leaves.items()}


def oracle(tensors, kwargs, upstream):
    leaves = {name: t.detach().clone().requires_grad_() for name, t in tensors.items()}
    loss = reference.global_pointer_loss(leaves["q"], leaves["k"], kwargs["spans"], kwargs["mask"], kwargs["rope"],
                                         kwargs["tril"], leaves.get("type_bias"), "none")
    loss.backward(upstream)
    return loss.detach(), {name: leaf.grad for name, leaf in leaves.items()}


def check_against_oracle(backend, tensors, kwargs, dtype, floor, gen):
    """The package rule (tests/oracle.py) for the per-row losses and every gradient; the gradient
    of q_i sums n pair terms, so their order may differ by sqrt(n) roundoffs."""
    batch, heads = kwargs["spans"].shape[:2]
    n = tensors["q"].shape[1]
    upstream = torch.randn(batch, heads, generator=gen, dtype=F64)
    exact_loss, exact_grads = oracle(tensors, kwargs, upstream)
    with fastnotes.use_backend("reference"):
        comp_loss, comp_grads = run(tensors, kwargs, upstream, dtype, "cpu")
    with fastnotes.use_backend(backend):
        loss, grads = run(tensors, kwargs, upstream, dtype)
    assert_close_to_oracle(loss, exact_loss, comp_loss, floor, f"{backend} loss", summed_terms=n)
    for name in exact_grads:
        assert grads[name].dtype == dtype, name
        assert_close_to_oracle(grads[name], exact_grads[name], comp_grads[name], floor, f"{backend} d{name}",
                               summed_terms=n)
