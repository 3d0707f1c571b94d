"""Reusable large output buffers for the CPU launchers.

On these machines writing into freshly allocated memory costs ~30 ms per 100 MB in page faults
(glibc maps every block over 32 MB afresh), more than the ZLPR backward kernel itself. A gradient
handed to autograd is normally dropped by the next step, so a launcher keeps the memory of the last
large buffer it handed out under a key (an "arena") and hands it out again once it is free.

"Free" is decided the way torch's own allocators decide it: when the storage is destroyed. Each
handout is torch.from_numpy over a new numpy view of the arena, and torch keeps that view alive
exactly as long as the storage exists, whoever holds it (a tensor or view of it, a .grad, an
untyped_storage() object, a hook's closure, DDP or a C++ owner). A weak reference to the view of the
last handout therefore says whether it is still in use; counting references to the storage cannot
(a Python storage object is cached on the storage and is counted once however many hold it). The
test and the handout happen under one lock, so two threads never get the same memory.

FASTNOTES_REUSE_BUFFERS=0 turns this off; release() drops the arenas (memory still in use stays
with its holders).
"""
import os
import threading
import weakref

import numpy as np
import torch

MIN_BYTES = 8 << 20  # below this malloc's heap reuses memory by itself
_lock = threading.Lock()
_arenas = {}  # key -> (arena: uint8 ndarray, weak reference to the view of its last handout)


def empty(key, shape, dtype):
    """An uninitialised tensor like torch.empty(shape, dtype=dtype), reusing memory when it can."""
    shape = torch.Size(shape)
    nbytes = shape.numel() * dtype.itemsize
    if os.environ.get("FASTNOTES_REUSE_BUFFERS", "1") == "0" or nbytes < MIN_BYTES:
        return torch.empty(shape, dtype=dtype)
    with _lock:
        arena, last_handout = _arenas.get(key, (None, None))
        if arena is None or arena.nbytes < nbytes or last_handout() is not None:
            # none yet, too small, or still owned by someone: a new arena (the old one, if in use,
            # stays with its owner and is freed by torch when they drop it)
            arena = np.empty(nbytes, np.uint8)
        handout = arena[:nbytes]
        _arenas[key] = (arena, weakref.ref(handout))
        tensor = torch.from_numpy(handout)
    return tensor.view(dtype).view(shape)


def release():
    """Drop every held arena."""
    with _lock:
        _arenas.clear()
