"""The op families and their kernels, in one place (docs/index.md, "Adding an op family").

A family is one name shared by all of its parts, and tests/test_structure.py checks that each exists:

    fastnotes/<module>                  the public op(s): argument checks, dispatch, autograd
    kernels/<backend>/<name>.py         one per backend in `backends`, each defining every name in
                                        `launchers` (and `AOT_CONFIGS` for the Triton kernels)
    fastnotes/reference/<name>.py       the plain-torch float64 oracle
    fastnotes/_selfcheck/<name>.py      its cases in `python -m fastnotes`
    docs/<name>.md                      the math

A kernel module that cannot take every call defines `unsupported(**call)` returning the reason (or
None): the one source of its limits, which the public op asks through `Family.unsupported`.
"""
import functools
import importlib
from dataclasses import dataclass

# What each backend needs installed, beyond a device it runs on (see _dispatch.availability).
BACKEND_REQUIRES = {"numba": ("numba",), "triton": ("triton",), "cuda": ("fastnotes._C", "triton")}


@functools.lru_cache(maxsize=None)
def _kernel_module(name):
    """importlib.import_module, remembered: every call of an op asks for its kernel module (through
    Family.unsupported), and a decode step's whole kernel takes tens of microseconds."""
    return importlib.import_module(name)


@dataclass(frozen=True)
class Family:
    name: str
    module: str  # the public module, relative to the package
    backends: tuple
    launchers: tuple

    def kernels(self, backend):
        """The kernel module fastnotes.kernels.<backend>.<name>, imported on first use (triton is never
        imported on a machine that cannot run it)."""
        if backend not in self.backends:
            raise ValueError(f"{self.name} has no {backend} kernels (it has {', '.join(self.backends)})")
        return _kernel_module(f"fastnotes.kernels.{backend}.{self.name}")

    def unsupported(self, backend, **call):
        """Why `backend` cannot run this call of the family (its kernel module's own `unsupported`), or None."""
        if backend == "reference":
            return None
        if backend not in self.backends:
            return f"no {backend} kernel for {self.name}"
        check = getattr(self.kernels(backend), "unsupported", None)
        return None if check is None else check(**call)


ZLPR = Family("zlpr", "zlpr", ("numba", "triton"),
              ("zlpr_forward", "zlpr_backward", "sparse_forward", "sparse_backward", "chunk_loss_and_grad"))
NM_CLASS = Family("nm_class", "nm_class", ("numba", "triton"), ("nm_class_forward", "nm_class_backward"))
EXACT = Family("exact", "exact", ("numba", "triton"), ("exact_forward", "exact_backward"))
ATTENTION = Family("attention", "attention", ("numba", "triton"), ("attention_forward", "attention_backward"))
LST = Family("lst", "lst", ("numba", "triton"), ("ladder_merge_forward", "ladder_merge_backward"))
DIFFUSION = Family("diffusion", "diffusion", ("numba", "triton"), ("sampler_step",))
HUBNESS = Family("hubness", "hubness", ("cuda", "triton", "numba"), ("candidates",))
AMOS = Family("amos", "optim", ("numba", "triton"), ("amos_step_tensors",))
GLOBAL_POINTER = Family("global_pointer", "global_pointer", ("numba", "triton"),
                        ("global_pointer_forward", "global_pointer_backward", "global_pointer_decode"))

FAMILIES = (ZLPR, NM_CLASS, EXACT, ATTENTION, LST, DIFFUSION, HUBNESS, AMOS, GLOBAL_POINTER)
