import os

import pytest
import torch

# Two cores on the CI machine: one intra-op thread per test process keeps runs predictable.
torch.set_num_threads(int(os.environ.get("MINITRON_TEST_THREADS", "1")))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from tiny import FAMILY_NAMES  # noqa: E402


@pytest.fixture(params=FAMILY_NAMES)
def family_name(request):
    return request.param


def pytest_collection_modifyitems(config, items):
    # MINITRON_GPU_TESTS=cpu: the GPU suite's CPU rehearsal (benchmarks/gpu/run.sh --device cpu) runs the
    # gpu-marked tests on the CPU instead of skipping them, so that they cannot rot between GPU runs.
    if not torch.cuda.is_available() and os.environ.get("MINITRON_GPU_TESTS") != "cpu":
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if item.get_closest_marker("gpu"):  # not `"gpu" in item.keywords`: that also matches a folder named gpu
                item.add_marker(skip)
