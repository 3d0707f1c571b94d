"""The CUDA extension fastnotes._C: it is built when nvcc is there, imports without a GPU, exposes its
kernels, compiles for sm_80/sm_90 without spills; setup.py builds without it when told to. The
kernels' correctness on a GPU is in tests/test_hubness_gpu.py."""
import importlib
import importlib.util
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
NVCC = shutil.which("nvcc") or (os.path.isfile("/usr/local/cuda/bin/nvcc") and "/usr/local/cuda/bin/nvcc") or None
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="no nvcc on this machine")


def _setup_module():
    spec = importlib.util.spec_from_file_location("fastnotes_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not __main__, so setup() does not run
    return module


@needs_nvcc
@pytest.mark.skipif(os.environ.get("FASTNOTES_CUDA", "auto") == "0", reason="installed with FASTNOTES_CUDA=0")
def test_extension_was_built_and_imports():
    ext = importlib.import_module("fastnotes._C")
    for name in ("topk_merge", "count_neighbours", "cuda_runtime_version"):
        assert callable(getattr(ext, name)), name
    from fastnotes.kernels.cuda import hubness

    assert ext.TOPK_MAX_K == hubness.MAX_K
    assert ext.cuda_runtime_version() >= 11000  # statically linked: no libcudart needed at run time
    with pytest.raises(ValueError, match="k must be in 1..1024"):
        ext.topk_merge(0, 0, 0, 1, 1, 1, 0, 0)


@needs_nvcc
def test_extension_does_not_link_cudart_dynamically():
    path = importlib.util.find_spec("fastnotes._C")
    if path is None:
        pytest.skip("fastnotes._C not built in this install")
    ldd = subprocess.run(["ldd", path.origin], check=False, capture_output=True, text=True).stdout
    assert "libcudart" not in ldd and "libtorch" not in ldd and "libc10" not in ldd, ldd


@needs_nvcc
@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_without_spills(arch, tmp_path):
    out = subprocess.run([NVCC, "-cubin", "-O3", "-std=c++17", f"-I{ROOT / 'csrc'}", "-Xptxas", "-v",
                          f"-gencode=arch=compute_{arch},code=sm_{arch}", str(ROOT / "csrc" / "hubness_topk.cu"),
                          "-o", str(tmp_path / "k.cubin")], check=False, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    kernels = re.findall(r"Compiling entry function '(\w+)'", out.stderr)
    assert any("topk_merge_kernel" in k for k in kernels) and any("count_neighbours_kernel" in k for k in kernels)
    spills = [int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out.stderr)]
    assert len(spills) == len(kernels) and not any(spills), out.stderr


def test_bindings_use_no_torch_headers():
    for path in (ROOT / "csrc").iterdir():
        text = path.read_text()
        assert not re.search(r"#include\s*[<\"](torch|ATen|c10)/", text), path


def test_gencode_flags():
    setup = _setup_module()
    assert setup.gencode_flags("80;90+PTX") == ["-gencode", "arch=compute_80,code=sm_80",
                                                "-gencode", "arch=compute_90,code=sm_90",
                                                "-gencode", "arch=compute_90,code=compute_90"]
    assert setup.gencode_flags("8.0 sm_90a, 10.0") == ["-gencode", "arch=compute_80,code=sm_80",
                                                       "-gencode", "arch=compute_90a,code=sm_90a",
                                                       "-gencode", "arch=compute_100,code=sm_100"]
    with pytest.raises(SystemExit, match="FASTNOTES_CUDA_ARCHS"):
        setup.gencode_flags("ampere")


def test_build_without_cuda(tmp_path):
    """FASTNOTES_CUDA=0 builds the pure-Python package: kernels/ mapped, no extension."""
    env = dict(os.environ, FASTNOTES_CUDA="0")
    out = subprocess.run([sys.executable, "setup.py", "-q", "build", "--build-base", str(tmp_path / "b")],
                         cwd=ROOT, env=env, check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lib = tmp_path / "b" / "lib"
    assert (lib / "fastnotes" / "kernels" / "cuda" / "hubness.py").is_file()
    assert (lib / "fastnotes" / "kernels" / "triton" / "hubness.py").is_file()
    assert not list(lib.rglob("_C*.so"))


def test_missing_extension_is_a_clear_error(monkeypatch):
    from fastnotes.kernels.cuda import hubness

    real_import = importlib.import_module

    def no_extension(name, *args):
        if name == "fastnotes._C":
            raise ImportError("No module named 'fastnotes._C'")
        return real_import(name, *args)

    monkeypatch.setattr(hubness.importlib, "import_module", no_extension)
    with pytest.raises(RuntimeError, match="needs the extension fastnotes._C"):
        hubness._extension()
