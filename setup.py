"""Build script: maps the top-level kernels/ folder onto the package fastnotes.kernels and, when a CUDA
compiler is found, builds the extension fastnotes._C from csrc/.

Metadata lives in pyproject.toml. No torch is needed to build: the Triton and Numba kernels are source,
compiled when first used, and fastnotes._C is plain pybind11 over raw pointers (no torch headers).

Environment:
  FASTNOTES_CUDA=auto|0|1    auto (default): build _C when nvcc is found; 0: never; 1: required (fail without nvcc)
  FASTNOTES_CUDA_ARCHS       compute capabilities, e.g. "80;90+PTX" (the default) or "8.0 9.0 10.0+PTX";
                             "+PTX" also embeds PTX for that arch, so newer GPUs can JIT it
  CUDA_HOME / CUDA_PATH      CUDA toolkit root; otherwise found from nvcc on PATH
  NVCC_THREADS               parallel nvcc compilation over archs (default 2)
"""
import os
import re
import shutil
import subprocess
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

CSRC = "csrc"
CUDA_SOURCES = [os.path.join(CSRC, "hubness_topk.cu")]
DEFAULT_ARCHS = "80;90+PTX"

kernel_packages = ["fastnotes.kernels"] + [f"fastnotes.kernels.{p}" for p in find_packages(where="kernels")]


def find_nvcc():
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if root and os.path.isfile(os.path.join(root, "bin", "nvcc")):
            return os.path.join(root, "bin", "nvcc")
    return shutil.which("nvcc") or (os.path.isfile("/usr/local/cuda/bin/nvcc") and "/usr/local/cuda/bin/nvcc") or None


def cuda_root(nvcc):
    """The toolkit root (include/, lib64/) of this nvcc, following symlinks such as /usr/local/bin/nvcc."""
    for candidate in (os.path.dirname(os.path.dirname(nvcc)),
                      os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"):
        if os.path.isfile(os.path.join(candidate, "include", "cuda_runtime.h")):
            return candidate
    sys.exit(f"fastnotes: found {nvcc} but no CUDA include/cuda_runtime.h beside it; set CUDA_HOME")


def gencode_flags(spec):
    """nvcc -gencode flags from FASTNOTES_CUDA_ARCHS ("80;90+PTX", "8.0 9.0", "sm_90")."""
    flags = []
    for item in filter(None, re.split(r"[;,\s]+", spec)):
        match = re.fullmatch(r"(?:sm_|compute_)?(\d+)\.?(\d*)([a-z]?)(\+PTX)?", item, re.IGNORECASE)
        if not match:
            sys.exit(f"fastnotes: FASTNOTES_CUDA_ARCHS: cannot read {item!r} (expected e.g. 80, 9.0, sm_90a, 90+PTX)")
        major, minor, suffix, ptx = match.groups()
        arch = (major + minor if minor else major) + suffix.lower()
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
        if ptx:
            flags += ["-gencode", f"arch=compute_{arch},code=compute_{arch}"]
    if not flags:
        sys.exit("fastnotes: FASTNOTES_CUDA_ARCHS names no architecture")
    return flags


class BuildWithNvcc(build_ext):
    """Compiles the .cu sources with nvcc into objects, then links them into the pybind11 module
    with the host compiler (cudart linked statically: the wheel needs only the NVIDIA driver)."""

    def build_extension(self, ext):
        nvcc = ext.nvcc
        os.makedirs(self.build_temp, exist_ok=True)
        objects = []
        for source in ext.cuda_sources:
            obj = os.path.join(self.build_temp, os.path.basename(source) + ".o")
            command = [nvcc, "-c", source, "-o", obj, "-O3", "-std=c++17", "-Xcompiler", "-fPIC",
                       f"-I{CSRC}", "--threads", os.environ.get("NVCC_THREADS", "2"), *ext.gencode]
            print(" ".join(command), flush=True)
            subprocess.run(command, check=True)
            objects.append(obj)
        ext.extra_objects = objects
        super().build_extension(ext)


def extensions():
    mode = os.environ.get("FASTNOTES_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"fastnotes: FASTNOTES_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return []
    nvcc = find_nvcc()
    if nvcc is None:
        if mode == "1":
            sys.exit("fastnotes: FASTNOTES_CUDA=1 but no nvcc found (set CUDA_HOME or put nvcc on PATH)")
        print("fastnotes: no nvcc found, building without the CUDA extension fastnotes._C", flush=True)
        return []
    import pybind11  # a build requirement (pyproject.toml); only needed for the extension

    root = cuda_root(nvcc)
    lib_dir = next((d for d in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib"))
                    if os.path.isfile(os.path.join(root, d, "libcudart_static.a"))), "lib64")
    ext = Extension(
        "fastnotes._C",
        sources=[os.path.join(CSRC, "bindings.cpp")],
        include_dirs=[CSRC, pybind11.get_include()],
        library_dirs=[os.path.join(root, lib_dir)],
        libraries=["cudart_static", "dl", "rt", "pthread"],
        extra_compile_args=["-O2", "-std=c++17", "-fvisibility=hidden"],
        extra_link_args=["-Wl,--strip-all"],  # 4.5 MB of symbols, mostly the static cudart's
        language="c++",
    )
    ext.nvcc = nvcc
    ext.cuda_sources = CUDA_SOURCES
    ext.gencode = gencode_flags(os.environ.get("FASTNOTES_CUDA_ARCHS", DEFAULT_ARCHS))
    return [ext]


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import it for gencode_flags
    setup(
        packages=find_packages(include=["fastnotes", "fastnotes.*"]) + kernel_packages,
        package_dir={"fastnotes": "fastnotes", "fastnotes.kernels": "kernels"},
        ext_modules=extensions(),
        cmdclass={"build_ext": BuildWithNvcc},
    )
