"""Su's probe (docs/attention.md) from examples/position_probe.py: identical inputs must
map to 1..n. Softmax with a T5 bias cannot (its outputs are equal across positions, MSE stuck at
var(1..n)); URPE and the l2 normaliser can (MSE at least 100x lower)."""
import importlib.util
import pathlib

import pytest
import torch


def _load_example():
    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "position_probe.py"
    spec = importlib.util.spec_from_file_location("position_probe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_position_probe(capsys):
    probe = _load_example()
    n, steps = 8, 300
    results = probe.run(n=n, steps=steps)
    assert "no-position floor" in capsys.readouterr().out
    floor = torch.arange(1, n + 1, dtype=torch.float64).var(unbiased=False).item()
    curve_a, outputs_a = results["softmax + T5 bias"]
    # (a): every position gets the same output at every step, so the MSE cannot go below the floor
    assert (outputs_a.max() - outputs_a.min()).item() <= 1e-5
    assert min(curve_a) >= floor * (1 - 1e-4)
    for name in ("softmax + T5 bias + URPE", "l2 + T5 bias"):
        curve, outputs = results[name]
        assert curve[-1] <= curve_a[-1] / 100, f"{name}: final MSE {curve[-1]:.3g} vs softmax {curve_a[-1]:.3g}"
        assert torch.all(outputs[1:] > outputs[:-1]), f"{name}: outputs not increasing: {outputs.tolist()}"


def test_position_probe_through_hf_t5():
    """The same probe through a one-layer Hugging Face T5EncoderModel patched by apply_to_t5:
    urpe=False is stuck at the floor (identical outputs at every position), urpe=True learns 1..n."""
    pytest.importorskip("transformers")
    probe = _load_example()
    n = 8
    floor = torch.arange(1, n + 1, dtype=torch.float64).var(unbiased=False).item()
    curve, outputs = probe.train_hf(urpe=False, n=n, steps=300)
    assert (outputs.max() - outputs.min()).item() <= 1e-5
    assert min(curve) >= floor * (1 - 1e-4)
    curve, outputs = probe.train_hf(urpe=True, n=n, steps=300)
    assert curve[-1] <= floor / 100, f"urpe=True: final MSE {curve[-1]:.3g} (floor {floor:.3g})"
    assert torch.all(outputs[1:] > outputs[:-1]), f"urpe=True: outputs not increasing: {outputs.tolist()}"
