import os

import pytest
import torch

# Triton's interpreter must be chosen before any @triton.jit kernel is defined. Without a GPU it is
# the only way to run the Triton kernels, so the tests turn it on; with a GPU they run for real.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torchfast  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is visible")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def restore_cpu_isa():
    yield
    if torchfast._ext.built():
        torchfast._ext.set_cpu_isa(None)
