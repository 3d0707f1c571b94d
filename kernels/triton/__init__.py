"""Triton GPU kernels, one module per op family. Each module lists the configurations it launches
in AOT_CONFIGS so tests/test_triton_aot.py compiles exactly those for sm_80 and sm_90."""
