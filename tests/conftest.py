import os

import pytest
import torch

# The Triton kernels run on CPU tensors under the interpreter; it is read when kernels are
# decorated, so set it before anything imports them. A real GPU runs them compiled.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastnotes  # noqa: E402
from fastnotes import _dispatch  # noqa: E402
from hypothesis import settings  # noqa: E402

# Property tests draw the same examples on every run, so CI never fails on a lucky draw; the other
# tests take fresh random inputs each run. HYPOTHESIS_PROFILE=explore draws fresh examples to hunt
# for new failures (a failing one is then saved in .hypothesis/ and replayed).
settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def available_backends(device_type=DEVICE):
    return [b for b in ("numba", "triton", "reference") if _dispatch.availability(b, device_type) is None]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=available_backends(), ids=lambda b: b)
def backend(request):
    with fastnotes.use_backend(request.param):
        yield request.param


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(torch.seed() % 2**31)
