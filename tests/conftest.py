import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


def pytest_configure(config: pytest.Config) -> None:
    """In-process tests start DeepSpeed's backend too (deepspeed.initialize): skip its shm op's JIT build here
    as every entry point of the package does (ds_smoes.parallel.launch.no_shm_comm_op_build says why)."""
    from ds_smoes.parallel.launch import no_shm_comm_op_build

    no_shm_comm_op_build()


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits dataset (seed 0), generated once per test session; tests must not modify it
    (copy it first, as the dataset-error tests do)."""
    from ds_smoes.data import generate_digits_dataset

    out_dir = tmp_path_factory.mktemp("digits")
    generate_digits_dataset(out_dir, seed=0)
    return out_dir


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `cuda` need a CUDA device: skipped where torch sees none (ci/gpu-check.sh runs them on a GPU)."""
    cuda_items = [item for item in items if item.get_closest_marker("cuda") is not None]
    if not cuda_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in cuda_items:
        item.add_marker(skip)
