"""Compile every Triton kernel configuration ahead of time for real GPUs, without a GPU.

Run as a script (TRITON_INTERPRET must be unset, so it runs in its own process); prints one JSON
line per (kernel, config, arch) with registers, spills and shared memory read off the cubin.
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
from triton.compiler import ASTSource

import fastnotes.kernels.triton as triton_kernels

ARCHS = (80, 90)
_TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def resource_usage(cubin):
    """(registers, spill bytes, static shared bytes) from cuobjdump's resource report."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        report = subprocess.run([os.path.join(_TOOLS, "cuobjdump"), "--dump-resource-usage", f.name],
                                check=True, capture_output=True, text=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", report))
    return int(fields["REG"]), int(fields.get("LOCAL", 0)) + int(fields.get("STACK", 0)), int(fields.get("SHARED", 0))


def main():
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter cannot compile for a GPU")
    for info in pkgutil.iter_modules(triton_kernels.__path__):
        module = importlib.import_module(f"{triton_kernels.__name__}.{info.name}")
        for kernel, signature, constexprs, num_warps in getattr(module, "AOT_CONFIGS", ()):
            for arch in ARCHS:
                compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                          target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
                regs, spills, static_shared = resource_usage(compiled.asm["cubin"])
                print(json.dumps({"module": info.name, "kernel": kernel.__name__, "arch": arch,
                                  "config": {k: v for k, v in constexprs.items()},
                                  "signature": {k: v for k, v in signature.items() if v != "constexpr"},
                                  "num_warps": num_warps, "registers": regs, "spill_bytes": spills,
                                  "shared_bytes": compiled.metadata.shared + static_shared}))


if __name__ == "__main__":
    main()
