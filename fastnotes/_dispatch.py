"""Backend choice, in one place.

Order of precedence: fastnotes.use_backend(...) (innermost wins), then FASTNOTES_BACKEND, then the
device: CUDA tensors -> cuda, triton; CPU tensors -> numba. When no fused kernel fits an automatic
choice falls back to the plain-torch reference with a one-time warning; a forced backend that cannot
run the call raises BackendUnsupportedError with the reason.
"""
import contextvars
import functools
import importlib.util
import os
import threading
import warnings

import torch

from ._registry import BACKEND_REQUIRES

BACKENDS = ("triton", "cuda", "numba", "reference")
_AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("numba", "reference")}
_forced = contextvars.ContextVar("fastnotes_backend", default=None)
_warned = set()


class BackendUnsupportedError(RuntimeError):
    """The requested backend cannot run this call; the message says why."""


def _check_name(name, source):
    if name not in BACKENDS:
        raise ValueError(f"{source}: unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


class use_backend:
    """Force a backend: `fastnotes.use_backend("numba")` sets it for the current context;
    `with fastnotes.use_backend("reference"): ...` sets it for the block and restores afterwards.
    `use_backend(None)` returns to automatic choice."""

    def __init__(self, name):
        self.name = None if name is None else _check_name(name, "use_backend")
        self._token = _forced.set(self.name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        _forced.reset(self._token)
        return False


def forced_backend():
    """The backend forced by use_backend or FASTNOTES_BACKEND, or None."""
    name = _forced.get()
    if name is not None:
        return name
    env = os.environ.get("FASTNOTES_BACKEND", "").strip()
    return _check_name(env, "FASTNOTES_BACKEND") if env else None


@functools.lru_cache(maxsize=None)
def _missing_module(module):
    return None if importlib.util.find_spec(module) is not None else f"{module} is not installed"


def _numba_openmp_started():
    try:
        from numba.np.ufunc import parallel
    except ImportError:
        return False
    return parallel._is_initialized and parallel._threading_layer == "omp"


# A process forked after numba started its OpenMP threading layer (a DataLoader worker, say) cannot
# enter a parallel region: GNU OpenMP aborts the process. Such a child runs the reference instead.
_numba_fork_problem = None


def _after_fork_in_child():
    global _numba_fork_problem
    if _numba_fork_problem is None and _numba_openmp_started():
        _numba_fork_problem = ("numba's OpenMP threading layer cannot run in a process forked after it started "
                               "(start workers with 'spawn' or 'forkserver' to use it there)")


os.register_at_fork(after_in_child=_after_fork_in_child)


def triton_interpreted():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _missing_requirement(backend):
    for module in BACKEND_REQUIRES[backend]:
        if _missing_module(module):
            return ("fastnotes was built without its CUDA extension" if module == "fastnotes._C"
                    else _missing_module(module))
    return None


def availability(backend, device_type):
    """None if `backend` can run on `device_type` here, else the reason it cannot."""
    if backend == "reference":
        return None
    if backend not in BACKEND_REQUIRES:
        raise ValueError(f"unknown backend {backend!r}")
    missing = _missing_requirement(backend)
    if missing:
        return missing
    if backend == "numba":
        return "numba runs on CPU tensors only" if device_type != "cpu" else _numba_fork_problem
    if backend == "triton":
        if device_type == "cpu" and not triton_interpreted():
            return "triton needs CUDA tensors (CPU tensors only under TRITON_INTERPRET=1, for testing)"
        if device_type not in ("cpu", "cuda"):
            return f"triton does not run on {device_type} tensors"
        return None
    return None if device_type == "cuda" else "the cuda backend needs CUDA tensors"


_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def float_kernel_reason(backend, tensor, name):
    """Why `backend` cannot take the floating tensor `name`, by the rules every float op shares:
    triton runs float32/float16/bfloat16 (float64 goes to numba and reference), its CPU interpreter
    float32 only. None if it can."""
    if backend == "triton":
        if tensor.dtype not in _TRITON_DTYPES:
            return f"triton takes float32/float16/bfloat16 {name} (float64 runs on numba and reference)"
        if tensor.device.type == "cpu" and tensor.dtype != torch.float32:
            return "the Triton interpreter (CPU) runs float32 only"
    return None


def kernel_reason(family, backend, tensor, name, **call):
    """Why `backend` cannot run this call of `family` (a _registry.Family): whether the family has
    such kernels and their own limits (`unsupported(**call)` in the kernel module), then the rules
    every float op shares for its floating tensor `name`. None if it can."""
    return family.unsupported(backend, **call) or float_kernel_reason(backend, tensor, name)


_numba_threads_started = False
_numba_threads_lock = threading.Lock()


def _start_numba_threads():
    """Start numba's threading layer before its first kernel, keeping torch's thread count. With
    the OpenMP layer numba shares torch's libgomp, and starting it sets the OpenMP thread count to
    numba's: a process that had called torch.set_num_threads(1) (a rank of a process group, a
    worker) would run every later torch op on all cores."""
    global _numba_threads_started
    with _numba_threads_lock:
        if _numba_threads_started:
            return
        from numba.np.ufunc import parallel
        threads = torch.get_num_threads()
        parallel._launch_threads()
        torch.set_num_threads(threads)
        _numba_threads_started = True


def select(op_name, device_type, why_not):
    """Pick the backend for one call. `why_not(backend)` gives the op's own reason a backend cannot
    run these arguments (dtype, shape, ...) or None."""
    backend = _select(op_name, device_type, why_not)
    if backend == "numba" and not _numba_threads_started:
        _start_numba_threads()
    return backend


def _select(op_name, device_type, why_not):

    def reason(backend):
        return availability(backend, device_type) or why_not(backend)

    forced = forced_backend()
    if forced is not None:
        problem = reason(forced)
        if problem:
            raise BackendUnsupportedError(f"{op_name}: backend {forced!r} cannot run this call: {problem}")
        return forced
    order = _AUTO_ORDER.get(device_type, ("reference",))
    reasons = {}
    for backend in order:
        problem = reason(backend)
        if problem is None:
            if backend == "reference" and reasons and (op_name, device_type) not in _warned:
                _warned.add((op_name, device_type))
                detail = "; ".join(f"{b}: {r}" for b, r in reasons.items())
                warnings.warn(f"{op_name}: no fused kernel for this call ({detail}); "
                              "using the plain-torch reference", RuntimeWarning, stacklevel=3)
            return backend
        reasons[backend] = problem
    raise BackendUnsupportedError(f"{op_name}: no backend can run this call: {reasons}")


def eager_op(fn):
    """Decorator for the public entry points of the fused kernels: torch.compile runs them as they
    are, with a graph break around the call, instead of tracing into the host-side checks and the
    Numba/Triton launches (which it cannot trace). Autograd through them works as in eager mode."""
    return torch.compiler.disable(fn)
