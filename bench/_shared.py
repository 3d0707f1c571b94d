"""Mechanics shared by the benchmarks (imported as `_shared`: pytest and `python bench/...` both put
bench/ on sys.path).

    backend_of(contender)      "fastnotes-numba..." -> "numba", any other contender -> None (no forcing)
    skip_reason(contender, device)   why a fastnotes contender does not run on that device, or None
    saved_bytes(fn, *inputs)   bytes autograd keeps for the backward of fn(*inputs), counted once per
                               storage with saved-tensor hooks (parameters of modules included)
    PeakRss()                  peak resident set size while a block runs, on Linux: freed heap memory is
                               handed back first (malloc_trim) and VmHWM reset (/proc/self/clear_refs);
                               then VmRSS is polled every millisecond and VmHWM folded in at the end
                               (VmHWM alone misses peaks: the kernel updates it lazily)
"""
import ctypes
import threading

import torch


def backend_of(contender):
    return contender.split("-")[1] if contender.startswith("fastnotes-") else None


def skip_reason(contender, device):
    backend = backend_of(contender)
    if backend == "numba" and device != "cpu":
        return "numba runs on CPU tensors"
    if backend == "triton" and device != "cuda":
        return "triton is benchmarked on CUDA only (the CPU interpreter is for tests)"
    return None


def saved_bytes(fn, *inputs):
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t

    leaves = [x.detach().requires_grad_() if x.is_floating_point() else x for x in inputs]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*leaves)
    return sum(seen.values())


def _status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0


class PeakRss:
    """with PeakRss() as rss: ...  then rss.peak - rss.before is the extra memory the block needed."""

    def __enter__(self):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # or the block would reuse freed heap memory unseen
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        self.before = self.peak = _status("VmRSS")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _status("VmRSS"))

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _status("VmHWM"), _status("VmRSS"))
        return False
