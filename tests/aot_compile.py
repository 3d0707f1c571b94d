"""Compile every Triton kernel configuration ahead of time for real GPUs, without a GPU.

Run as a script (TRITON_INTERPRET must be unset, so it runs in its own process); prints one JSON
line per (kernel, config, arch) with registers and spills from ptxas and shared memory from Triton.
"""
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia import compiler as nvidia_compiler
from triton.compiler import ASTSource

import fastnotes.kernels.triton as triton_kernels

ARCHS = (80, 90)


def ptxas_report(ptx, arch):
    """(registers, spill bytes) from `ptxas -v` on the kernel's PTX, with the ptxas and register
    allocation option Triton itself uses for that arch."""
    ptxas = nvidia_compiler.get_ptxas(arch).path
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run([ptxas, "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}", src, "-o",
                              os.path.join(tmp, "kernel.cubin")], check=True, capture_output=True, text=True).stderr
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    stores, loads = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log).groups()
    return registers, int(stores) + int(loads)


def main():
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter cannot compile for a GPU")
    for info in pkgutil.iter_modules(triton_kernels.__path__):
        module = importlib.import_module(f"{triton_kernels.__name__}.{info.name}")
        for kernel, signature, constexprs, num_warps in getattr(module, "AOT_CONFIGS", ()):
            for arch in ARCHS:
                compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                          target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
                regs, spills = ptxas_report(compiled.asm["ptx"], arch)
                print(json.dumps({"module": info.name, "kernel": kernel.__name__, "arch": arch,
                                  "config": {k: v for k, v in constexprs.items()},
                                  "signature": {k: v for k, v in signature.items() if v != "constexpr"},
                                  "num_warps": num_warps, "registers": regs, "spill_bytes": spills,
                                  "shared_bytes": compiled.metadata.shared}))


if __name__ == "__main__":
    main()
