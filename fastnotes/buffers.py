"""Reuse of large gradient buffers by the CPU kernels.

On CPU, writing a large gradient into fresh memory costs more in page faults than the fused kernel
takes, so the ZLPR family's backward (dense, sparse, fused linear) hands out the memory of its last
large gradient again once torch has destroyed every owner of it (any tensor, view, .grad, storage
object or hook keeps it). Threads never share a buffer. Buffers under 8 MB are never kept.

- `FASTNOTES_REUSE_BUFFERS=0` in the environment: always allocate.
- `release()`: drop the kept buffers (memory still in use stays with its owners).
"""
from .kernels._buffers import MIN_BYTES, release

__all__ = ["MIN_BYTES", "release"]
