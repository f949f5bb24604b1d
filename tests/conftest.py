import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The suite runs more torch processes than there are cores (2 pytest workers, each starting snakemake
# jobs, torchrun processes, `dico` commands). OpenMP threads that busy-wait between parallel regions
# then burn the cores the other processes need: 4 two-thread processes on 2 cores ran 4.5x longer with
# the default wait policy than with PASSIVE (bench/RESULTS.md). Inherited by every subprocess; set
# before anything imports torch (libgomp reads it once). The demo itself keeps the default: there a
# two-thread job runs alone, and sleeping threads would slow it by ~25 %.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    torch.set_num_threads(1)
    yield


# The order the files run in under pytest-xdist (pyproject.toml: 2 workers, a file whole on one worker,
# files handed out in collection order, each worker starting with two): the two longest files first,
# one per worker, each with a short file queued behind it, then the other long ones, then the rest.
LONG_FIRST = ["test_pipeline.py", "test_rehearsal.py", "test_losses.py", "test_tokenizer.py", "test_slurm.py",
              "test_workstation.py", "test_envs.py",
              "test_fault_injection.py", "test_model.py", "test_cli_ddp.py", "test_bench.py"]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
