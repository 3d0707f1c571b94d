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


def test_every_kernel_compiles_for_both_archs(compiled):
    from fastnotes.kernels.triton import zlpr

    expected = {(k.__name__, arch) for k, *_ in zlpr.AOT_CONFIGS for arch in (80, 90)}
    assert expected <= {(r["kernel"], r["arch"]) for r in compiled}
    assert len(compiled) == 2 * len(zlpr.AOT_CONFIGS)


def test_no_spills_and_shared_memory_fits(compiled):
    for r in compiled:
        assert r["spill_bytes"] == 0, f"register spills: {r}"
        assert r["shared_bytes"] <= SHARED_LIMIT[r["arch"]], f"shared memory over the limit: {r}"
        assert 0 < r["registers"] <= 255, r
