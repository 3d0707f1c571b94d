"""fastnotes.kernels: raw compute only. Triton kernels (GPU) under .triton, Numba kernels (CPU) under
.numba. Nothing here imports the public API; the public layer checks arguments before calling in."""
