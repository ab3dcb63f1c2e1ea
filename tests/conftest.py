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


@pytest.fixture(scope="session")
def canvas32_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 32x32 canvas digits (seed 0), generated once per test session; read-only for tests."""
    from ds_smoes.data import generate_digits_dataset

    out_dir = tmp_path_factory.mktemp("canvas32")
    generate_digits_dataset(out_dir, seed=0, canvas_size=32)
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


class TwoRankScenarios:
    """The reports of tests/dist_scripts/scenarios.py: every 2-rank scenario in one DeepSpeed launch."""

    def __init__(self, out: Path, proc, shm_segments_created: list[str]) -> None:
        self.out, self.proc, self.shm_segments_created = out, proc, shm_segments_created

    def output(self) -> str:
        from sweep_util import tail

        return tail(self.proc, 4000)

    def reports(self, name: str, ranks: int = 2) -> list[dict]:
        """Scenario `name`'s per-rank reports (OUT/<name>/rank{r}.json); fails with the rank's error, or the
        launch's output, when the scenario did not finish."""
        import json

        folder = self.out / name
        errors = sorted(folder.glob("error*.txt"))
        if errors:
            pytest.fail(f"2-rank scenario {name} failed:\n" + errors[0].read_text()[-4000:])
        missing = [r for r in range(ranks) if not (folder / f"rank{r}.json").exists()]
        if missing:
            pytest.fail(f"2-rank scenario {name} wrote no report for ranks {missing} (exit {self.proc.returncode}; "
                        f"an earlier scenario may have stopped the launch):\n{self.output()}")
        return [json.loads((folder / f"rank{r}.json").read_text()) for r in range(ranks)]

    @staticmethod
    def names() -> list[str]:
        """Every scenario the launch runs (scenarios.py's SCENARIOS, read without importing its script folder)."""
        import ast

        tree = ast.parse((Path(__file__).resolve().parent / "dist_scripts" / "scenarios.py").read_text())
        table = next(n.value for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "SCENARIOS")
        return [entry[0] for entry in ast.literal_eval(table)]



@pytest.fixture(scope="session")
def two_rank_scenarios(tmp_path_factory: pytest.TempPathFactory, digits_dir: Path) -> TwoRankScenarios:
    """Every scenario of tests/dist_scripts/ run once, in one 2-rank launch (a launch costs about 15 s of
    start-up on 2 cores); the tests that need one assert on its reports."""
    from launch import ROOT, deepspeed_run
    from sweep_util import make_small_split, write_base_config

    out = tmp_path_factory.mktemp("two_rank_scenarios")
    small_config = write_base_config(out, digits_dir, make_small_split(digits_dir, out / "small"))
    shm = Path("/dev/shm")

    def shm_segments() -> set[str]:  # DeepSpeed's CPU shm all-reduce buffers (test_placement checks none appear)
        return {p.name for p in shm.glob("deepspeed_allreduce_buffer_*")} if shm.is_dir() else set()

    before = shm_segments()
    proc = deepspeed_run([str(ROOT / "tests" / "dist_scripts" / "scenarios.py"), "--out", str(out),
                          "--small-config", str(small_config)], timeout=1500)
    return TwoRankScenarios(out, proc, sorted(shm_segments() - before))


class DemoRun:
    """`make demo`'s command run once per test session into a temporary folder, MLflow into its own SQLite."""

    def __init__(self, out: Path, proc, tracking_uri: str) -> None:
        self.out, self.proc, self.tracking_uri = out, proc, tracking_uri

    def output(self) -> str:
        from sweep_util import tail

        return tail(self.proc, 4000)

    @property
    def metrics(self) -> dict:
        import json

        assert self.proc.returncode == 0, self.output()
        return json.loads((self.out / "metrics.json").read_text())


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    """The demo (configs/demo.yaml: 1,900 steps on 2 ranks, bins frozen and experts placed at step 150,
    checkpoint saved), trained once: the demo's own checks and the export / eval-only round trip read it.
    The data is the demo's own (data/digits, generated on first use as `make demo` does)."""
    import subprocess
    import sys

    from launch import ROOT, env, free_port

    sys.path.insert(0, str(ROOT / "ci"))
    import demo_figures

    folder = tmp_path_factory.mktemp("demo")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    cmd = demo_figures.demo_command(folder / "run", free_port(), tracking_uri=uri)
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=1800)
    return DemoRun(folder / "run", proc, uri)
