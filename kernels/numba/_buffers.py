"""Reusable large output buffers for the CPU launchers.

On these machines writing into freshly allocated memory costs ~30 ms per 100 MB in page faults
(glibc maps every block over 32 MB afresh), more than the ZLPR backward kernel itself. A
gradient handed to autograd is normally dropped by the next step, so a launcher keeps the last
large buffer it allocated under a key and hands it out again once nothing else refers to its
storage. Callers always get a new alias (detach) of the held base, so every outside holder (a
saved .grad, a hook, a user variable) raises the storage's use count and blocks reuse.

FASTNOTES_REUSE_BUFFERS=0 turns this off; release() drops what is held.
"""
import os

import torch

MIN_BYTES = 8 << 20  # below this malloc's heap reuses memory by itself
_held = {}


def _outside_refs(base):
    # use count minus the base itself and the temporary storage object made to ask
    return torch._C._storage_Use_Count(base.untyped_storage()._cdata) - 2


def empty(key, shape, dtype):
    """An uninitialised tensor like torch.empty(shape, dtype=dtype), reusing memory when it can."""
    shape = torch.Size(shape)
    if os.environ.get("FASTNOTES_REUSE_BUFFERS", "1") == "0" or \
            shape.numel() * torch.empty((), dtype=dtype).element_size() < MIN_BYTES:
        return torch.empty(shape, dtype=dtype)
    base = _held.get(key)
    if base is None or base.shape != shape or base.dtype != dtype or _outside_refs(base) != 0:
        base = torch.empty(shape, dtype=dtype)
        _held[key] = base
    return base.detach()


def release():
    """Drop every held buffer."""
    _held.clear()
