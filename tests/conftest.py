import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    torch.set_num_threads(1)
    yield


# The order the files run in under pytest-xdist (pyproject.toml: 2 workers, a file whole on one worker,
# files handed out in collection order, each worker starting with two): the two longest files first,
# one per worker, each with a short file queued behind it, then the other long ones, then the rest.
LONG_FIRST = ["test_pipeline.py", "test_rehearsal.py", "test_losses.py", "test_tokenizer.py", "test_slurm.py",
              "test_fault_injection.py", "test_model.py", "test_cli_ddp.py", "test_bench.py"]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
