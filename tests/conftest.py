import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits dataset (seed 0), generated once per test session; tests must not modify it
    (copy it first, as the dataset-error tests do)."""
    from ds_smoes.data import generate_digits_dataset

    out_dir = tmp_path_factory.mktemp("digits")
    generate_digits_dataset(out_dir, seed=0)
    return out_dir
