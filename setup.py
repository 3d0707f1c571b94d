"""Build script: maps the top-level kernels/ folder onto the package fastnotes.kernels.

Metadata lives in pyproject.toml. No torch is needed to build: the kernels are Triton and Numba
source, compiled when first used.
"""
from setuptools import find_packages, setup

kernel_packages = ["fastnotes.kernels"] + [f"fastnotes.kernels.{p}" for p in find_packages(where="kernels")]

setup(
    packages=find_packages(include=["fastnotes", "fastnotes.*"]) + kernel_packages,
    package_dir={"fastnotes": "fastnotes", "fastnotes.kernels": "kernels"},
)
