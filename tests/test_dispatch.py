"""Backend choice: device default, FASTNOTES_BACKEND, use_backend, and errors that say why."""
import subprocess
import sys

import pytest
import torch
from conftest import available_backends

import fastnotes
from fastnotes import _dispatch


def test_cpu_default_is_numba(monkeypatch):
    monkeypatch.delenv("FASTNOTES_BACKEND", raising=False)
    if "numba" not in available_backends("cpu"):
        pytest.skip("numba not installed")
    assert _dispatch.select("op", "cpu", lambda b: None) == "numba"


def test_fallback_to_reference_warns_once(monkeypatch):
    monkeypatch.delenv("FASTNOTES_BACKEND", raising=False)
    monkeypatch.setattr(_dispatch, "_warned", set())
    with pytest.warns(RuntimeWarning, match="numba: not today"):
        assert _dispatch.select("op", "cpu", lambda b: "not today" if b == "numba" else None) == "reference"


def test_use_backend_context_and_call(monkeypatch):
    monkeypatch.delenv("FASTNOTES_BACKEND", raising=False)
    with fastnotes.use_backend("reference"):
        assert _dispatch.forced_backend() == "reference"
        with fastnotes.use_backend("numba"):
            assert _dispatch.forced_backend() == "numba"
        assert _dispatch.forced_backend() == "reference"
    assert _dispatch.forced_backend() is None
    with fastnotes.use_backend(None):
        assert _dispatch.forced_backend() is None


def test_environment_variable(monkeypatch):
    monkeypatch.setenv("FASTNOTES_BACKEND", "reference")
    assert _dispatch.select("op", "cpu", lambda b: None) == "reference"
    monkeypatch.setenv("FASTNOTES_BACKEND", "warp")
    with pytest.raises(ValueError, match="FASTNOTES_BACKEND: unknown backend 'warp'"):
        _dispatch.select("op", "cpu", lambda b: None)


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        fastnotes.use_backend("fast")


def test_forced_backend_that_cannot_run_says_why():
    logits = torch.zeros(2, 3, dtype=torch.float64)
    with fastnotes.use_backend("triton"), pytest.raises(fastnotes.BackendUnsupportedError, match="float64"):
        fastnotes.multilabel_ce(logits, torch.zeros(2, 3))
    with fastnotes.use_backend("cuda"), pytest.raises(fastnotes.BackendUnsupportedError, match="CUDA tensors"):
        fastnotes.multilabel_ce(torch.zeros(2, 3), torch.zeros(2, 3))


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = _dispatch.availability("triton", "cpu")
    assert reason is not None and "CUDA" in reason


def test_environment_variable_end_to_end():
    """FASTNOTES_BACKEND reaches the op in a fresh process."""
    code = ("import torch, fastnotes\n"
            "import fastnotes._dispatch as D\n"
            "seen = []\n"
            "orig = D.select\n"
            "D.select = lambda *a: seen.append(orig(*a)) or seen[-1]\n"
            "fastnotes.multilabel_ce(torch.zeros(2, 3), torch.zeros(2, 3))\n"
            "print(seen[0])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "FASTNOTES_BACKEND": "reference"})
    assert out.stdout.strip() == "reference"
