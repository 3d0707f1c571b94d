"""Every Triton kernel configuration compiles ahead of time for sm_80 and sm_90, without spills and
within the shared-memory limit. Runs tests/aot_compile.py in a process without TRITON_INTERPRET."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = pathlib.Path(__file__).with_name("aot_compile.py")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def _kernel_modules():
    import importlib
    import pkgutil

    import fastnotes.kernels.triton as package

    return [importlib.import_module(f"{package.__name__}.{m.name}") for m in pkgutil.iter_modules(package.__path__)]


def test_every_kernel_compiles_for_both_archs(compiled):
    modules = _kernel_modules()
    assert modules, "no Triton kernel modules found"
    for module in modules:
        assert getattr(module, "AOT_CONFIGS", None), f"{module.__name__} lists no AOT_CONFIGS"
    expected = sum(2 * len(m.AOT_CONFIGS) for m in modules)
    assert len(compiled) == expected
    for module in modules:
        jitted = {name for name, obj in vars(module).items() if name.endswith("_kernel") and callable(obj)}
        covered = {r["kernel"] for r in compiled if r["module"] == module.__name__.rsplit(".", 1)[1]}
        assert jitted <= covered, f"{module.__name__}: kernels never compiled ahead of time: {jitted - covered}"


def test_no_spills_and_shared_memory_fits(compiled):
    for r in compiled:
        assert r["spill_bytes"] == 0, f"register spills: {r}"
        assert r["shared_bytes"] <= SHARED_LIMIT[r["arch"]], f"shared memory over the limit: {r}"
        assert 0 < r["registers"] <= 255, r
