"""Ladder Side-Tuning modules: one ladder (LadderMerge), the side network over a frozen backbone
(LadderSideNetwork) and the Fisher importance that initialises it. Math: docs/lst.md."""
import torch

from ..lst import ladder_merge


class LadderMerge(torch.nn.Module):
    """One ladder: a Linear(D -> d) downsample of the backbone state merged into the side stream by
    a learnable gate (alpha initialised to 0: mu = 0.5), or added (gate=False, Su's variant)."""

    def __init__(self, backbone_dim, side_dim, *, bias=True, gate=True, temperature=0.1, alpha_init=0.0):
        super().__init__()
        linear = torch.nn.Linear(backbone_dim, side_dim, bias=bias)
        self.weight = linear.weight
        self.bias = linear.bias
        self.alpha = torch.nn.Parameter(torch.tensor(float(alpha_init))) if gate else None
        self.temperature = temperature

    def forward(self, s, h):
        return ladder_merge(s, h, self.weight, self.bias, self.alpha, temperature=self.temperature)


def _default_side_block(width, n_heads):
    return torch.nn.TransformerEncoderLayer(width, n_heads, dim_feedforward=4 * width, dropout=0.0,
                                            batch_first=True)


def fisher_importance(module, loss_fn, batches):
    """Empirical Fisher importance of module's parameters (docs/lst.md, 'Conventions'): the sum over
    `batches` of (d loss_fn(batch) / d theta)^2, elementwise. With batches of one sample this is the
    paper's fisher-v2 score (1024 training samples); pass the result to init_from_backbone.

    loss_fn(batch) -> scalar loss computed through module. Parameters are switched to requires_grad
    for the passes and set back afterwards; .grad is left untouched (torch.autograd.grad).
    Returns {parameter: importance tensor} (float32, float64 for float64 parameters)."""
    params = list(module.parameters())
    if not params:
        raise ValueError("fisher_importance: module has no parameters")
    importance = {p: torch.zeros_like(p, dtype=torch.float64 if p.dtype == torch.float64 else torch.float32)
                  for p in params}
    flags = [p.requires_grad for p in params]
    seen = 0
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            for batch in batches:
                loss = loss_fn(batch)
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    raise ValueError("fisher_importance: loss_fn must return a scalar loss tensor")
                grads = torch.autograd.grad(loss.reshape(()), params, allow_unused=True)
                for p, g in zip(params, grads):
                    if g is not None:
                        importance[p] += g.to(importance[p].dtype) ** 2
                seen += 1
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    if seen == 0:
        raise ValueError("fisher_importance: batches is empty")
    return importance


def _top_rows(scores, k):
    """Indices of the k rows of a non-negative score matrix with the largest sums (L1), in order."""
    return scores.sum(1).topk(k).indices.sort().values


def _copy_pruned_block(big, small, keep, score):
    """Copy the pruned sub-tensors of one nn.TransformerEncoderLayer into a narrower one, ranking
    rows by score(parameter), a non-negative importance of the parameter's shape."""
    heads = big.self_attn.num_heads
    if small.self_attn.num_heads != heads:
        raise ValueError("init_from_backbone: side blocks need the backbone's number of heads")
    d_big, d_small = big.self_attn.embed_dim, small.self_attn.embed_dim
    head_big, head_small = d_big // heads, d_small // heads
    q, k, v = score(big.self_attn.in_proj_weight)[:, keep].chunk(3)
    score_qkv = (q * k * v).sum(1)  # the elementwise product of the three importances
    rows = torch.cat([h * head_big + score_qkv[h * head_big:(h + 1) * head_big].topk(head_small).indices.sort().values
                      for h in range(heads)])
    in_rows = torch.cat([rows, rows + d_big, rows + 2 * d_big])
    small.self_attn.in_proj_weight.copy_(big.self_attn.in_proj_weight[in_rows][:, keep])
    small.self_attn.in_proj_bias.copy_(big.self_attn.in_proj_bias[in_rows])
    small.self_attn.out_proj.weight.copy_(big.self_attn.out_proj.weight[keep][:, rows])
    small.self_attn.out_proj.bias.copy_(big.self_attn.out_proj.bias[keep])
    units = _top_rows(score(big.linear1.weight)[:, keep], small.linear1.out_features)
    small.linear1.weight.copy_(big.linear1.weight[units][:, keep])
    small.linear1.bias.copy_(big.linear1.bias[units])
    small.linear2.weight.copy_(big.linear2.weight[keep][:, units])
    small.linear2.bias.copy_(big.linear2.bias[keep])
    for norm in ("norm1", "norm2"):
        getattr(small, norm).weight.copy_(getattr(big, norm).weight[keep])
        getattr(small, norm).bias.copy_(getattr(big, norm).bias[keep])


class LadderSideNetwork(torch.nn.Module):
    """A trainable side network next to a frozen backbone (LST).

    Two ways to wrap the backbone:
        LadderSideNetwork(blocks, d_model, ...)          blocks: modules [B, L, D] -> [B, L, D];
            forward(x) runs them on x (the embeddings) without autograd and ladders their outputs.
        LadderSideNetwork.from_hooks(model, modules, d_model, ...)   a Hugging Face style model:
            forward(*args, **kwargs) runs model(*args, **kwargs) without autograd; forward hooks
            capture the outputs of `modules` (the first of a tuple): modules[0] is the side input
            (e.g. the embedding layer), the others are the laddered layers.
    Side network (paper, add_residual_after=False): s = W_0 h_0 + b_0; for each laddered layer i:
    s = SideBlock_i(merge_i(s, h_i)); output W_up LayerNorm(s) of width D.

    Args:
        d_model: backbone width D. reduction: r, side width d = D // r (8 in the paper).
        n_heads: heads of the default side block (nn.TransformerEncoderLayer, FFN 4d).
        side_block: callable (width) -> module, instead of the default block.
        layers: indices of the backbone layers that get a ladder and a side block (default all).
        gate, temperature: the ladder gate (True, 0.1) or Su's plain add (gate=False).
    The backbone's parameters are set to requires_grad=False. init_from_backbone() initialises the
    side blocks by structured pruning of the backbone's (optional; the paper's fisher-v2 init).
    """

    def __init__(self, blocks, d_model, *, reduction=8, n_heads=4, side_block=None, layers=None, gate=True,
                 temperature=0.1):
        super().__init__()
        if not isinstance(d_model, int) or d_model <= 0:
            raise ValueError(f"LadderSideNetwork: d_model must be a positive int, got {d_model!r}")
        if not isinstance(reduction, int) or reduction <= 0 or d_model % reduction:
            raise ValueError(f"LadderSideNetwork: reduction must be a positive int dividing d_model={d_model}, "
                             f"got {reduction!r}")
        width = d_model // reduction
        if side_block is None and width % n_heads:
            raise ValueError(f"LadderSideNetwork: side width {width} is not divisible by n_heads={n_heads}")
        self.backbone = torch.nn.ModuleList(blocks) if blocks is not None else None
        n_layers = len(self.backbone) if self.backbone is not None else None
        self._hooked = None
        self.d_model, self.width = d_model, width
        self._init_side(n_layers, layers, side_block or (lambda w: _default_side_block(w, n_heads)), gate, temperature)
        if self.backbone is not None:
            self.backbone.requires_grad_(False)

    def _init_side(self, n_layers, layers, side_block, gate, temperature):
        layers = list(range(n_layers)) if layers is None else sorted(set(layers))
        if any(not isinstance(i, int) or i < 0 or (n_layers is not None and i >= n_layers) for i in layers):
            raise ValueError(f"LadderSideNetwork: layers must be backbone layer indices in [0, {n_layers}), got {layers}")
        self.layers = layers
        self.side_input = torch.nn.Linear(self.d_model, self.width)
        # indexed by backbone layer (as strings), not by side layer: skipped layers have none
        self.ladders = torch.nn.ModuleDict({str(i): LadderMerge(self.d_model, self.width, gate=gate,
                                                                temperature=temperature) for i in layers})
        self.side_blocks = torch.nn.ModuleDict({str(i): side_block(self.width) for i in layers})
        self.final_norm = torch.nn.LayerNorm(self.width)
        self.upsample = torch.nn.Linear(self.width, self.d_model)

    @classmethod
    def from_hooks(cls, model, modules, d_model, **kwargs):
        if len(modules) < 2:
            raise ValueError("LadderSideNetwork.from_hooks: give the side-input module and at least one layer")
        net = cls(None, d_model, **{**kwargs, "layers": kwargs.get("layers", list(range(len(modules) - 1)))})
        if any(i >= len(modules) - 1 for i in net.layers):
            raise ValueError(f"LadderSideNetwork.from_hooks: layers must index the {len(modules) - 1} hooked layers")
        model.requires_grad_(False)
        object.__setattr__(net, "_hooked", (model, list(modules)))  # not a submodule: not trained, not saved
        return net

    def backbone_states(self, *args, **kwargs):
        """The side input h_0 and the laddered states {layer: h_i}, computed without autograd."""
        with torch.no_grad():
            if self._hooked is None:
                (x,) = args
                states, h = {}, x
                for i, block in enumerate(self.backbone):
                    h = block(h)
                    if i in self.ladders_index:
                        states[i] = h
                return x, states
            model, modules = self._hooked
            captured = {}
            handles = [m.register_forward_hook(lambda _m, _in, out, k=k: captured.__setitem__(
                k, out[0] if isinstance(out, (tuple, list)) else out)) for k, m in enumerate(modules)]
            try:
                model(*args, **kwargs)
            finally:
                for handle in handles:
                    handle.remove()
            return captured[0], {i: captured[i + 1] for i in self.layers}

    @torch.no_grad()
    def init_from_backbone(self, importance=None):
        """Structured-pruning init of the side blocks (docs/lst.md). The importance of a backbone
        parameter is importance[p] when given (fisher_importance(...): the paper's fisher-v2 init),
        else its magnitude |p|. For an nn.TransformerEncoderLayer backbone and side blocks with the
        same number of heads: keep the width model channels with the largest LayerNorm-gain
        importance summed over the layers; per head the query/key/value rows with the largest L1 of
        the product of the three importances over the kept inputs; the FFN units with the largest L1
        importance; copy those sub-tensors in. Ladders, gates and the upsample keep their default
        init. Returns the kept model channels."""
        blocks = list(self.backbone) if self.backbone is not None else self._hooked[1][1:]
        if not all(isinstance(b, torch.nn.TransformerEncoderLayer) for b in blocks):
            raise ValueError("init_from_backbone: needs backbone layers of type nn.TransformerEncoderLayer")
        sides = {i: self.side_blocks[str(i)] for i in self.layers}
        if not all(isinstance(b, torch.nn.TransformerEncoderLayer) for b in sides.values()):
            raise ValueError("init_from_backbone: needs the default side blocks (nn.TransformerEncoderLayer)")
        if importance is None:
            score = torch.abs
        else:
            missing = [name for b in blocks for name, p in b.named_parameters() if p not in importance]
            if missing:
                raise ValueError(f"init_from_backbone: importance has no entry for backbone parameter {missing[0]!r} "
                                 "(compute it with fisher_importance over the backbone)")

            def score(p):
                value = importance[p]
                if value.shape != p.shape:
                    raise ValueError(f"init_from_backbone: importance of shape {tuple(value.shape)} for a parameter "
                                     f"of shape {tuple(p.shape)}")
                return value.to(p.device, torch.float64).abs()
        gains = sum(score(b.norm1.weight) + score(b.norm2.weight) for b in blocks)
        keep = gains.topk(self.width).indices.sort().values
        for i, side in sides.items():
            _copy_pruned_block(blocks[i], side, keep, score)
        return keep

    @property
    def ladders_index(self):
        return set(self.layers)

    def forward(self, *args, **kwargs):
        h0, states = self.backbone_states(*args, **kwargs)
        s = self.side_input(h0)
        for i in self.layers:
            s = self.side_blocks[str(i)](self.ladders[str(i)](s, states[i]))
        return self.upsample(self.final_norm(s))
