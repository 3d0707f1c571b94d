"""Build script: maps the top-level kernels/ folder onto the package fastnotes.kernels.

Metadata lives in pyproject.toml. No torch is needed to build: the kernels are Triton and Numba
source, compiled when first used.
"""
from setuptools import setup

setup(
    packages=[
        "fastnotes",
        "fastnotes.reference",
        "fastnotes.kernels",
        "fastnotes.kernels.numba",
        "fastnotes.kernels.triton",
    ],
    package_dir={"fastnotes": "fastnotes", "fastnotes.kernels": "kernels"},
)
