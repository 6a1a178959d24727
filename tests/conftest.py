"""Shared fixtures: offline, seeded, in a temporary directory; what tests share besides
fixtures is in tests/helpers.py."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The state store simulates a GPU on the CPU: copies land only when waited for, and state
# that is away from the device is unusable (hift_cli/offload.py). Subprocesses inherit it.
os.environ.setdefault("HIFT_STRICT_OFFLOAD", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from helpers import compose_config  # noqa: E402


@pytest.fixture
def tiny_cfg():
    return compose_config


@pytest.fixture(autouse=True)
def _in_tmp_dir(tmp_path, monkeypatch):
    """Runs write outputs/ and multirun/ into the working directory: never the repo's."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
