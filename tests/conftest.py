"""Test-suite setup. TRITON_INTERPRET must be set before anything imports triton, so that the
Triton kernels run on the CPU through the interpreter (DESIGN 8)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")

import pathlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared"
COCO_SAMPLE = SHARED / "data" / "coco_panoptic_sample"


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    skip_slow = pytest.mark.skip(reason="slow: pass --runslow to run")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    has_cuda = torch.cuda.is_available()
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture
def coco_sample():
    """Path to the 2-image real COCO panoptic sample, or skip when it is absent."""
    if not (COCO_SAMPLE / "panoptic_examples.json").exists():
        pytest.skip(f"real COCO sample not found at {COCO_SAMPLE}")
    return COCO_SAMPLE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
