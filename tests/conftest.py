"""Shared test setup: no hub access, GPU tests skipped on CPU-only machines."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_addoption(parser):
    parser.addoption(
        "--runslow",
        action="store_true",
        help="also run tests marked slow (the 1,000-job server load test, multi-worker kills, long trainings)",
    )


def pytest_collection_modifyitems(config, items):
    run_slow = config.getoption("--runslow") or os.environ.get("FLUXION_RUN_SLOW") == "1"
    no_gpu = pytest.mark.skip(reason="needs a CUDA device")
    not_now = pytest.mark.skip(reason="slow: run with --runslow (or FLUXION_RUN_SLOW=1)")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        if "slow" in item.keywords and not run_slow:
            item.add_marker(not_now)


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """`fluxion` commands run in-process pick a CPU thread count for the machine's load (cli.configure_threads);
    keep that from leaking into the next test."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
