"""Ladder Side-Tuning: the fused ladder merge against the float64 reference and the oracles of
docs/lst.md, 'Worked examples', and LadderSideNetwork (frozen backbone, saved-activation memory)."""
import pytest
import torch
from oracle import FLOORS, LST_FLOORS, assert_close_to_oracle

import fastnotes
from fastnotes import reference
from fastnotes.lst import LadderMerge, LadderSideNetwork, fisher_importance, ladder_merge

T = 0.1


def spec_inputs(dtype=torch.float64):
    t = torch.arange(3, dtype=dtype)[:, None]
    h = torch.sin(4 * t + torch.arange(4, dtype=dtype))
    s = torch.cos(2 * t + torch.arange(2, dtype=dtype))
    w = 0.1 * torch.arange(8, dtype=dtype).reshape(2, 4) - 0.3
    b = torch.tensor([0.05, -0.1], dtype=dtype)
    g = torch.tensor([[1, -0.5], [0.25, 2], [-1.5, 0.75]], dtype=dtype)
    return s, h, w, b, g


def run_merge(s, h, w, b, alpha, g):
    """(out, [ds, dW, db, dalpha]) through fastnotes.ladder_merge with the active backend."""
    leaves = [x.detach().clone().requires_grad_() if x is not None else None for x in (s, w, b, alpha)]
    s_, w_, b_, a_ = leaves
    out = ladder_merge(s_, h, w_, b_, a_, temperature=T)
    grads = torch.autograd.grad(out, [x for x in leaves if x is not None], g)
    return out.detach(), list(grads)


def test_spec_oracles(backend):
    dtype = torch.float32 if backend == "triton" else torch.float64
    tol = 3e-6 if dtype == torch.float32 else 1e-8
    s, h, w, b, g = spec_inputs(dtype)
    out, (ds, dw, db, dalpha) = run_merge(s, h, w, b, torch.tensor(0.0, dtype=dtype), g)
    expected_out = [[0.39538803, 0.46891687], [0.04031016, -0.58924381], [-0.46423634, -0.09909035]]
    torch.testing.assert_close(out.double(), torch.tensor(expected_out, dtype=torch.float64), rtol=0, atol=tol)
    torch.testing.assert_close(ds, 0.5 * g)
    expected_dw = [[-0.83661900, -0.00821891, 0.82773761, 0.90267598], [-0.38579315, -1.01474759, -0.71074777, 0.24671027]]
    torch.testing.assert_close(dw.double(), torch.tensor(expected_dw, dtype=torch.float64), rtol=0, atol=tol)
    torch.testing.assert_close(db.double(), torch.tensor([-0.125, 1.125], dtype=torch.float64), rtol=0, atol=tol)
    assert abs(dalpha.item() - 1.12241473) < 10 * tol
    out, (_, _, db, dalpha) = run_merge(s, h, w, b, torch.tensor(0.05, dtype=dtype), g)
    torch.testing.assert_close(out[0].double(), torch.tensor([0.54346879, 0.48640049], dtype=torch.float64), rtol=0, atol=tol)
    torch.testing.assert_close(db.double(), torch.tensor([-0.09438517, 0.84946650], dtype=torch.float64), rtol=0, atol=tol)
    assert abs(dalpha.item() - 1.05508651) < 10 * tol


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "ungated"])
@pytest.mark.parametrize("shape", [(37, 20, 45), (1, 8, 16), (2, 5, 33, 24)], ids=str)
def test_merge_matches_float64_reference(backend, rng, gated, shape):
    *lead, d, D = shape
    s = torch.randn(*lead, d, generator=rng, dtype=torch.float64)
    h = torch.randn(*lead, D, generator=rng, dtype=torch.float64)
    w = torch.randn(d, D, generator=rng, dtype=torch.float64) / D ** 0.5
    b = torch.randn(d, generator=rng, dtype=torch.float64)
    alpha = torch.tensor(0.07, dtype=torch.float64) if gated else None
    g = torch.randn(*lead, d, generator=rng, dtype=torch.float64)
    exact_out, exact_grads = _reference_with_grads(s, h, w, b, alpha, g)
    fp32 = [x.float() if x is not None else None for x in (s, h, w, b, alpha, g)]
    comp_out, comp_grads = _reference_with_grads(*fp32)
    out, grads = run_merge(*fp32[:4], fp32[4], fp32[5])
    assert_close_to_oracle(out, exact_out, comp_out, LST_FLOORS[torch.float32], "out")
    # dalpha = mu (1 - mu) / T sum g (s - z), z = h W^T + b, computed z-free as
    # sum(g s) - <W, g^T h> - <b, sum g>: the size of the terms it adds up
    mu = torch.sigmoid(alpha / T) if gated else torch.tensor(0.0, dtype=torch.float64)
    alpha_terms = (mu * (1 - mu) / T * (g.abs() * (s.abs() + h.abs() @ w.abs().T + b.abs())).sum()).item()
    for name, got, exact, comp in zip(("ds", "dW", "db", "dalpha"), grads, exact_grads, comp_grads):
        assert_close_to_oracle(got, exact, comp, LST_FLOORS[torch.float32], name,
                               terms=alpha_terms if name == "dalpha" else 0.0)
    if backend != "triton":  # the float64 path
        out64, grads64 = run_merge(s, h, w, b, alpha, g)
        torch.testing.assert_close(out64, exact_out, rtol=0, atol=1e-12)
        for got, exact in zip(grads64, exact_grads):
            torch.testing.assert_close(got, exact, rtol=1e-12, atol=1e-12)


def _reference_with_grads(s, h, w, b, alpha, g):
    leaves = [x.detach().clone().requires_grad_() if x is not None else None for x in (s, w, b, alpha)]
    s_, w_, b_, a_ = leaves
    out = reference.lst.ladder_merge(s_, h, w_, b_, a_, T)
    return out.detach(), list(torch.autograd.grad(out, [x for x in leaves if x is not None], g))


def test_merge_gradcheck_float64():
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(7, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    h = torch.randn(7, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True)
    alpha = torch.tensor(0.03, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *x: reference.lst.ladder_merge(*x, T), (s, h, w, b, alpha))
    with fastnotes.use_backend("numba"):
        assert torch.autograd.gradcheck(lambda *x: ladder_merge(*x, temperature=T), (s, h, w, b, alpha))
        assert torch.autograd.gradcheck(lambda s_, h_, w_: ladder_merge(s_, h_, w_), (s, h, w))


def test_ungated_is_su_plain_add(backend, rng):
    s = torch.randn(9, 4, generator=rng)
    h = torch.randn(9, 6, generator=rng)
    w = torch.randn(4, 6, generator=rng)
    torch.testing.assert_close(ladder_merge(s, h, w), s + h @ w.t(), rtol=1e-5, atol=1e-5)


def test_bfloat16_backbone_state(rng):
    """h from a bf16 backbone is cast once to the side dtype; the result matches the fp64 oracle of
    the rounded h."""
    s = torch.randn(6, 4, generator=rng)
    h = torch.randn(6, 8, generator=rng).to(torch.bfloat16)
    w = torch.randn(4, 8, generator=rng)
    out = ladder_merge(s, h, w, None, torch.tensor(0.2))
    exact = reference.lst.ladder_merge(s.double(), h.double(), w.double(), None, torch.tensor(0.2, dtype=torch.float64), T)
    torch.testing.assert_close(out.double(), exact, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"s": torch.zeros(3, 5)}, ValueError, "s must be"),
    ({"h": torch.zeros(4, 6)}, ValueError, "h must be"),
    ({"weight": torch.zeros(4)}, ValueError, "weight"),
    ({"bias": torch.zeros(3)}, ValueError, "bias"),
    ({"alpha": torch.zeros(2)}, ValueError, "alpha"),
    ({"temperature": 0.0}, ValueError, "temperature"),
    ({"s": torch.zeros(3, 4, dtype=torch.int64)}, TypeError, "s must have dtype"),
    ({"weight": torch.zeros(4, 6, dtype=torch.float64)}, TypeError, "share a dtype"),
])
def test_bad_arguments(kwargs, error, match):
    args = {"s": torch.zeros(3, 4), "h": torch.zeros(3, 6), "weight": torch.zeros(4, 6), "bias": torch.zeros(4),
                "alpha": torch.zeros(()), "temperature": 0.1}
    args.update(kwargs)
    temperature = args.pop("temperature")
    with pytest.raises(error, match=match):
        ladder_merge(**args, temperature=temperature)


# ---- LadderSideNetwork -----------------------------------------------------------------------------

D_MODEL, N_HEADS, N_LAYERS, BATCH, SEQ = 256, 4, 4, 8, 64


def small_backbone():
    torch.manual_seed(0)
    return [torch.nn.TransformerEncoderLayer(D_MODEL, N_HEADS, 4 * D_MODEL, dropout=0.0, batch_first=True)
            for _ in range(N_LAYERS)]


def test_no_gradient_reaches_the_backbone():
    blocks = small_backbone()
    net = LadderSideNetwork(blocks, D_MODEL, reduction=8, n_heads=4)
    before = [p.detach().clone() for p in net.backbone.parameters()]
    x = torch.randn(2, 5, D_MODEL)
    net(x).pow(2).mean().backward()
    assert all(p.grad is None and not p.requires_grad for p in net.backbone.parameters())
    trainable = [p for p in net.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)
    assert all(torch.equal(a, p) for a, p in zip(before, net.backbone.parameters()))
    n_side = sum(p.numel() for p in trainable)
    n_backbone = sum(p.numel() for p in net.backbone.parameters())
    assert n_side < 0.15 * n_backbone


def _saved_bytes(run):
    """Bytes of tensors autograd saves for backward during run(), parameters excluded (counted once
    per storage)."""
    seen = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = run()
    loss.backward()
    return sum(seen.values())


def test_lst_saves_at_most_40_percent_of_full_fine_tuning():
    x = torch.randn(BATCH, SEQ, D_MODEL)
    full = torch.nn.Sequential(*small_backbone())
    head = torch.nn.Linear(D_MODEL, 2)
    full_bytes = _saved_bytes(lambda: head(full(x)).mean())
    net = LadderSideNetwork(small_backbone(), D_MODEL, reduction=8, n_heads=4)
    lst_bytes = _saved_bytes(lambda: head(net(x)).mean())
    assert lst_bytes <= 0.4 * full_bytes, f"LST saves {lst_bytes / 1e6:.2f} MB vs full {full_bytes / 1e6:.2f} MB"


def test_layers_subset_and_ungated():
    net = LadderSideNetwork(small_backbone(), D_MODEL, reduction=16, n_heads=2, layers=[1, 3], gate=False)
    assert sorted(net.ladders) == ["1", "3"] and net.ladders["1"].alpha is None
    out = net(torch.randn(2, 3, D_MODEL))
    assert out.shape == (2, 3, D_MODEL)
    with pytest.raises(ValueError, match="layers"):
        LadderSideNetwork(small_backbone(), D_MODEL, layers=[4])
    with pytest.raises(ValueError, match="reduction"):
        LadderSideNetwork(small_backbone(), D_MODEL, reduction=3)
    with pytest.raises(ValueError, match="n_heads"):
        LadderSideNetwork(small_backbone(), D_MODEL, reduction=8, n_heads=3)


def test_from_hooks_matches_block_list():
    """A model with its own forward (embedding + encoder), wrapped through forward hooks, gives the
    same side output as the block-list form on the same states."""
    blocks = small_backbone()

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(50, D_MODEL)
            self.layers = torch.nn.ModuleList(blocks)

        def forward(self, ids):
            h = self.embed(ids)
            for layer in self.layers:
                h = layer(h)
            return (h,)

    model = Model()
    hooked = LadderSideNetwork.from_hooks(model, [model.embed, *model.layers], D_MODEL, reduction=8)
    listed = LadderSideNetwork(blocks, D_MODEL, reduction=8)
    listed.load_state_dict(hooked.state_dict(), strict=False)
    ids = torch.randint(0, 50, (2, 7))
    out = hooked(ids)
    torch.testing.assert_close(out, listed(model.embed(ids).detach()), rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert all(p.grad is None for p in model.parameters())
    assert not any(k.startswith("backbone") for k in hooked.state_dict())


def test_init_from_backbone_copies_pruned_sub_tensors():
    blocks = small_backbone()
    net = LadderSideNetwork(blocks, D_MODEL, reduction=8, n_heads=N_HEADS)
    keep = net.init_from_backbone()
    width = D_MODEL // 8
    gains = sum(b.norm1.weight.abs() + b.norm2.weight.abs() for b in blocks)
    assert keep.shape == (width,) and set(keep.tolist()) == set(gains.topk(width).indices.tolist())
    big, small = blocks[2], net.side_blocks["2"]
    torch.testing.assert_close(small.norm2.weight, big.norm2.weight[keep])
    torch.testing.assert_close(small.linear2.bias, big.linear2.bias[keep])
    # every side FFN unit is one backbone unit, restricted to the kept channels
    for row in small.linear1.weight:
        assert (big.linear1.weight[:, keep] == row).all(1).any()
    # per head the kept query rows come from that head of the backbone
    head_big, head_small = D_MODEL // N_HEADS, width // N_HEADS
    q_small = small.self_attn.in_proj_weight[:width]
    for h in range(N_HEADS):
        q_big = big.self_attn.in_proj_weight[h * head_big:(h + 1) * head_big][:, keep]
        for row in q_small[h * head_small:(h + 1) * head_small]:
            assert (q_big == row).all(1).any()
    assert torch.isfinite(net(torch.randn(2, 5, D_MODEL))).all()
    with pytest.raises(ValueError, match="heads"):
        LadderSideNetwork(small_backbone(), D_MODEL, reduction=8, n_heads=2).init_from_backbone()


def test_fisher_importance_sums_squared_per_sample_gradients(rng):
    """The empirical Fisher equals the sum of per-sample squared gradients computed one by one; the
    frozen flags and .grad are left as they were."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)).double()
    model.requires_grad_(False)
    samples = [(torch.randn(1, 4, generator=rng, dtype=torch.float64), torch.randn(1, 2, generator=rng,
                                                                              dtype=torch.float64)) for _ in range(5)]

    def loss_fn(sample):
        x, y = sample
        return ((model(x) - y) ** 2).sum()

    got = fisher_importance(model, loss_fn, samples)
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())
    copy = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)).double()
    copy.load_state_dict(model.state_dict())
    expected = [torch.zeros_like(p) for p in copy.parameters()]
    for x, y in samples:
        copy.zero_grad()
        ((copy(x) - y) ** 2).sum().backward()
        for e, p in zip(expected, copy.parameters()):
            e += p.grad ** 2
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(got[p], e, rtol=1e-12, atol=0)
        assert got[p].dtype == torch.float64 and (e > 0).any()
    with pytest.raises(ValueError, match="empty"):
        fisher_importance(model, loss_fn, [])
    with pytest.raises(ValueError, match="scalar"):
        fisher_importance(model, lambda s: model(s[0]), samples)


def test_init_from_backbone_follows_the_given_importance():
    """Magnitudes passed as importance reproduce the default init; an importance that favours other
    channels, heads rows and FFN units makes the init keep exactly those."""
    width = D_MODEL // 8
    default = LadderSideNetwork(small_backbone(), D_MODEL, reduction=8, n_heads=N_HEADS)
    magnitudes = {p: p.detach().abs() for p in default.backbone.parameters()}
    again = LadderSideNetwork(small_backbone(), D_MODEL, reduction=8, n_heads=N_HEADS)
    again.load_state_dict(default.state_dict())
    assert torch.equal(again.init_from_backbone({q: magnitudes[p] for q, p in zip(again.backbone.parameters(),
                                                                                   default.backbone.parameters())}),
                       default.init_from_backbone())
    for a, b in zip(again.side_blocks.parameters(), default.side_blocks.parameters()):
        assert torch.equal(a, b)
    # an importance that is large exactly on the last `width` channels (LayerNorm gains) and on the
    # last FFN units: the init must keep those, whatever the magnitudes say
    net = LadderSideNetwork(small_backbone(), D_MODEL, reduction=8, n_heads=N_HEADS)
    favoured = {p: torch.ones_like(p) for p in net.backbone.parameters()}
    n_units = net.side_blocks["0"].linear1.out_features
    for block in net.backbone:
        favoured[block.norm1.weight][-width:] = 10.0
        favoured[block.linear1.weight][-n_units:] = 10.0
    keep = net.init_from_backbone(favoured)
    assert keep.tolist() == list(range(D_MODEL - width, D_MODEL))
    big, small = net.backbone[1], net.side_blocks["1"]
    torch.testing.assert_close(small.linear1.weight, big.linear1.weight[-n_units:][:, keep])
    with pytest.raises(ValueError, match="no entry"):
        net.init_from_backbone({})
    # a hooked backbone prunes its laddered layers the same way, here by a Fisher importance
    layers = torch.nn.ModuleList(small_backbone())
    embed = torch.nn.Linear(D_MODEL, D_MODEL)
    model = torch.nn.Sequential(embed, *layers)
    x = torch.randn(3, 1, 5, D_MODEL)
    fisher = fisher_importance(model, lambda xi: model(xi).square().mean(), x)
    hooked = LadderSideNetwork.from_hooks(model, [embed, *layers], D_MODEL, reduction=8, n_heads=N_HEADS)
    listed = LadderSideNetwork(list(layers), D_MODEL, reduction=8, n_heads=N_HEADS)
    assert torch.equal(hooked.init_from_backbone(fisher), listed.init_from_backbone(fisher))
    torch.testing.assert_close(hooked.side_blocks["2"].linear2.weight, listed.side_blocks["2"].linear2.weight)
    with pytest.raises(ValueError, match="shape"):
        net.init_from_backbone({p: torch.ones(3) for p in net.backbone.parameters()})


def test_ladder_merge_module_starts_at_half_gate():
    merge = LadderMerge(8, 2)
    assert torch.sigmoid(merge.alpha / merge.temperature).item() == 0.5


# ---- double backward, autocast -----------------------------------------------------------------------

def test_double_backward(backend):
    """The fused backward is not differentiable: a gradient taken with create_graph=True must raise
    when differentiated again (it once failed inside numpy, or acted as a constant). The reference
    path is a torch composite with an exact second derivative: gradgradcheck."""
    dtype = torch.float32 if backend == "triton" else torch.float64
    gen = torch.Generator().manual_seed(4)
    s, w = (torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_() for shape in ((5, 3), (3, 4)))
    h = torch.randn(5, 4, generator=gen, dtype=dtype)
    b = torch.randn(3, generator=gen, dtype=dtype).requires_grad_()
    alpha = torch.tensor(0.1, dtype=dtype).requires_grad_()
    if backend == "reference":
        assert torch.autograd.gradgradcheck(lambda *x: ladder_merge(x[0], h, *x[1:], temperature=T), (s, w, b, alpha))
        return
    # a loss linear in the output hands the backward a gradient with no graph: still tied to the inputs
    for loss in (lambda o: o.sum(), lambda o: o.square().sum()):
        for wrt in (s, w, alpha):
            out = ladder_merge(s, h, w, b, alpha, temperature=T)
            g = torch.autograd.grad(loss(out), wrt, create_graph=True)[0]
            with pytest.raises(RuntimeError, match="differentiated again"):
                g.square().sum().backward()


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "ungated"])
@pytest.mark.parametrize("backend_name", ["numba", "reference"])  # the Triton interpreter runs float32 only
def test_cpu_autocast_bfloat16(backend_name, rng, gated):
    """Under autocast the merge runs in bfloat16 as the nn.Linear composite would (output bfloat16),
    with float32 accumulation; gradients keep the parameters' dtypes (alpha stays float32); values
    within bfloat16 rounding of the float64 oracle: at most 2x the error of the composite under
    autocast plus 2^-7 of the largest value (s and the output are rounded to bfloat16 here)."""
    n, d, big_d = 70, 12, 40
    s, h, w, b, g = (torch.randn(*shape, generator=rng, dtype=torch.float64)
                     for shape in ((n, d), (n, big_d), (d, big_d), (d,), (n, d)))
    w = w / big_d ** 0.5
    alpha = torch.tensor(0.07, dtype=torch.float64) if gated else None
    exact_out, exact_grads = _reference_with_grads(s, h, w, b, alpha, g)

    def under_autocast(fn):
        leaves = [x.float().requires_grad_() if x is not None else None for x in (s, w, b, alpha)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(leaves[0], h.float(), *leaves[1:])
        grads = torch.autograd.grad(out, [x for x in leaves if x is not None], g.to(out.dtype))
        return out, grads

    def composite(s_, h_, w_, b_, a_):
        z = torch.nn.functional.linear(h_, w_, b_)  # bfloat16 under autocast
        mu = torch.sigmoid(a_ / T) if a_ is not None else None
        return s_ + z if mu is None else mu * s_ + (1 - mu) * z

    comp_out, comp_grads = under_autocast(composite)
    with fastnotes.use_backend(backend_name):
        out, grads = under_autocast(lambda *x: ladder_merge(*x, temperature=T))
    assert out.dtype == torch.bfloat16
    assert all(x.dtype == torch.float32 for x in grads)
    assert_close_to_oracle(out, exact_out, comp_out, FLOORS[torch.bfloat16], "out")
    # dalpha sums g (s - z) mu (1 - mu) / T over every entry, terms that cancel: the op rounds s to
    # bfloat16 as autocast casts its inputs, the composite keeps s in float32, so allow one bfloat16
    # roundoff of the summed size (a wrong dalpha is off by its own size, ~sqrt(n d) times more)
    z = torch.nn.functional.linear(h, w, b)
    mu = torch.sigmoid(alpha / T) if gated else None
    dalpha_terms = (g.abs() * (s.abs() + z.abs())).sum() * mu * (1 - mu) / T if gated else 0.0
    for name, got, exact, comp in zip(("ds", "dW", "db", "dalpha"), grads, exact_grads, comp_grads):
        terms = dalpha_terms if name == "dalpha" else 0.0
        assert_close_to_oracle(got, exact, comp, FLOORS[torch.bfloat16], name, terms=terms, roundoff=2.0**-8)


# ---- parameters off their defaults, paths the shapes above miss -------------------------------------

@pytest.mark.parametrize("rows, d, D", [(1100, 64, 24), (70, 70, 40)], ids=["threads", "tiles"])
def test_off_default_temperature_no_bias_and_tiles(backend, rng, rows, d, D):
    """temperature != 0.1 and bias=None with the gate; 1100 x 64 outputs take the numba threaded
    path (N d >= 2^16), 70 x 70 several Triton tiles with tails in rows and columns."""
    if backend == "triton" and rows > 100:
        pytest.skip("the Triton interpreter pays per tile: the tile case covers it")
    s, h, g = (torch.randn(rows, n, generator=rng, dtype=torch.float64) for n in (d, D, d))
    w = torch.randn(d, D, generator=rng, dtype=torch.float64) / D ** 0.5
    alpha = torch.tensor(0.3, dtype=torch.float64)
    dtype = torch.float32 if backend == "triton" else torch.float64
    temperature = 0.7

    def grads(fn, cast):
        leaves = [x.to(cast).clone().requires_grad_() for x in (s, w, alpha)]
        out = fn(leaves[0], h.to(cast), leaves[1], None, leaves[2], temperature)
        return [out.detach(), *torch.autograd.grad(out, leaves, g.to(cast))]

    exact = grads(reference.lst.ladder_merge, torch.float64)
    composite = grads(reference.lst.ladder_merge, dtype)
    got = grads(lambda *x: ladder_merge(*x[:5], temperature=x[5]), dtype)
    mu = torch.sigmoid(alpha / temperature)
    alpha_terms = (mu * (1 - mu) / temperature * (g.abs() * (s.abs() + h.abs() @ w.abs().T)).sum()).item()
    for name, a, e, c in zip(("out", "ds", "dW", "dalpha"), got, exact, composite):
        assert_close_to_oracle(a, e, c, LST_FLOORS[dtype], name,
                               terms=alpha_terms if name == "dalpha" else 0.0)
