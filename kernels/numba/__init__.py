"""Numba CPU kernels, one module per op family. Shared math lives in _math."""
