"""Su's probe (docs/attention.md): map identical inputs [x, ..., x] to [1, ..., n].

A one-layer model: one learned token vector repeated n times -> RelPosSelfAttention -> a linear
read-out per position, trained with MSE against 1..n. Three variants:
  (a) softmax + T5 bias:  rows of A sum to 1 and all values are equal, so every position gets the
      same output; the best it can do is the mean, MSE = var(1..n) (the no-position floor)
  (b) + URPE:             o_i = sum_j a_ij C(i - j) v, no renormalisation: positions separate
  (c) l2 normaliser:      a_ij = exp(s_ij) / sqrt(sum_j exp(2 s_ij)): row l1 norms differ
The T5 bias is bidirectional (signed buckets): a symmetric bias could not tell i from n + 1 - i.
train_hf runs (a) and (b) through a one-layer Hugging Face T5EncoderModel patched by
fastnotes.integrations.transformers.apply_to_t5(urpe=False / True) instead (--hf; needs transformers).

    python examples/position_probe.py [--hf]
"""
import contextlib

import numba
import torch

import fastnotes

VARIANTS = {
    "softmax + T5 bias": dict(normalizer="softmax", urpe=False),
    "softmax + T5 bias + URPE": dict(normalizer="softmax", urpe=True),
    "l2 + T5 bias": dict(normalizer="l2", urpe=False),
}


class ProbeModel(torch.nn.Module):
    def __init__(self, n, dim=16, heads=4, *, normalizer, urpe):
        super().__init__()
        self.n = n
        self.token = torch.nn.Parameter(torch.randn(dim))
        self.attention = fastnotes.RelPosSelfAttention(dim, heads, position="t5", urpe=urpe, normalizer=normalizer)
        self.readout = torch.nn.Linear(dim, 1)

    def forward(self):
        x = self.token.expand(1, self.n, -1)  # identical inputs at every position
        return self.readout(self.attention(x)).reshape(self.n)


@contextlib.contextmanager
def one_thread():
    """A model this small trains ~7x faster on one thread than with the thread wake-ups of two on a
    busy machine (torch and numba threads both)."""
    torch_threads, numba_threads = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(torch_threads)
        numba.set_num_threads(numba_threads)


def train(variant, n=8, steps=400, lr=0.03, seed=0):
    """Returns (per-step MSE list, final outputs [n])."""
    torch.manual_seed(seed)
    model = ProbeModel(n, **VARIANTS[variant])
    target = torch.arange(1, n + 1, dtype=torch.float32)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    curve = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(), target)
        loss.backward()
        optimizer.step()
        curve.append(loss.item())
    with torch.no_grad():
        return curve, model()


class HFProbeModel(torch.nn.Module):
    """The probe through a Hugging Face T5EncoderModel (one layer, built from a config) patched by
    fastnotes.integrations.transformers.apply_to_t5: the same token id at every position -> the
    encoder (T5 bias, optional URPE tables) -> a linear read-out per position."""

    def __init__(self, n, *, urpe, dim=16, heads=4):
        super().__init__()
        import transformers

        from fastnotes.integrations.transformers import apply_to_t5

        config = transformers.T5Config(vocab_size=4, d_model=dim, d_kv=dim // heads, d_ff=2 * dim, num_layers=1,
                                       num_heads=heads, relative_attention_num_buckets=32,
                                       relative_attention_max_distance=128, dropout_rate=0.0,
                                       feed_forward_proj="relu", attn_implementation="eager")
        self.ids = torch.full((1, n), 2)  # identical inputs: one token id everywhere
        self.encoder = apply_to_t5(transformers.T5EncoderModel(config), urpe=urpe)
        self.readout = torch.nn.Linear(dim, 1)

    def forward(self):
        return self.readout(self.encoder(input_ids=self.ids).last_hidden_state).reshape(-1)


def train_hf(urpe, n=8, steps=300, lr=0.03, seed=0):
    """Returns (per-step MSE list, final outputs [n]) of HFProbeModel."""
    torch.manual_seed(seed)
    model = HFProbeModel(n, urpe=urpe)
    target = torch.arange(1, n + 1, dtype=torch.float32)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    curve = []
    with one_thread():
        for _ in range(steps):
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(model(), target)
            loss.backward()
            optimizer.step()
            curve.append(loss.item())
        with torch.no_grad():
            return curve, model()


def run(n=8, steps=400):
    with one_thread():
        results = {name: train(name, n, steps) for name in VARIANTS}
    floor = torch.arange(1, n + 1, dtype=torch.float64).var(unbiased=False).item()
    print(f"probe: n = {n}, target 1..{n}, no-position floor MSE = var(1..n) = {floor:.4f}")
    marks = sorted({0, 9, 49, 99, 199, steps - 1} & set(range(steps)))
    print("step  " + "".join(f"{name:>28}" for name in results))
    for step in marks:
        print(f"{step + 1:>4}  " + "".join(f"{curve[step]:>28.3e}" for curve, _ in results.values()))
    for name, (_, outputs) in results.items():
        print(f"{name:>26}: " + " ".join(f"{o:6.3f}" for o in outputs.tolist()))
    return results


if __name__ == "__main__":
    import sys

    if "--hf" in sys.argv:
        for urpe in (False, True):
            curve, outputs = train_hf(urpe)
            print(f"HF T5 encoder, urpe={urpe}: final MSE {curve[-1]:.3e}, outputs "
                  + " ".join(f"{o:6.3f}" for o in outputs.tolist()))
    else:
        run()
