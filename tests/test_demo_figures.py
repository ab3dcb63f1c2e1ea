"""README's table of `make demo` figures comes from the code: ci/demo_figures.py renders it from a run's
metrics.json (pinned here by hand), and a slow test runs the demo's own command (the Makefile's, with its
output redirected) and checks README.md against what it gives."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "ci"))
import demo_figures  # noqa: E402

METRICS = {"seed": 0, "world_size": 2, "steps": 1900, "acc_multimodal": 0.95264, "num_test_multimodal": 359,
           "acc_language": 1.0, "num_test_language": 400, "acc_overall": 0.97760, "msi": 0.74512,
           "msi_per_layer": [0.7744, 0.7166], "cross_rank_rate": 0.6594, "ranks_per_token": 1.3197,
           "cross_rank_rate_physical": 0.6594, "bytes_per_token": 300.4, "dispatch": "rank_once",
           "stock_bytes_per_token": 600.8, "test_loss": 0.06112}


def test_render_by_hand():
    text = demo_figures.render(METRICS)
    assert "| accuracy, multimodal questions | 0.9526 (359 questions) |" in text
    assert "| modality specialisation index (MSI) | 0.745 (per MoE layer 0.774, 0.717) |" in text
    assert "| remote bytes per token and MoE layer, rank_once dispatch | 300 |" in text
    assert "| the same routes through DeepSpeed's stock dispatch | 601 (-50.0 % for rank_once) |" in text
    no_stock = demo_figures.render({**METRICS, "dispatch": "deepspeed", "stock_bytes_per_token": None})
    assert "stock dispatch |" not in no_stock


def test_write_then_check_round_trip(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{demo_figures.BEGIN}\nold figures\n{demo_figures.END}\noutro\n")
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps(METRICS))
    assert demo_figures.main([str(metrics), "--readme", str(readme), "--check"]) == 1
    assert demo_figures.main([str(metrics), "--readme", str(readme), "--write"]) == 0
    assert demo_figures.main([str(metrics), "--readme", str(readme), "--check"]) == 0
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old figures" not in text


def test_readme_has_the_block():
    demo_figures.block((ROOT / "README.md").read_text())   # raises when the markers are missing


def _demo_command(out: Path, port: int) -> list[str]:
    """The `demo` target's deepspeed command from the Makefile, with its output (metrics and MLflow) redirected."""
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^demo: .*\n((?:\t.*\n)+)", makefile, re.M).group(1)
    words = recipe.replace("\\\n", " ").splitlines()[0].split()
    assert words[0] == "$(VENV)/bin/deepspeed", words
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--master_port", str(port)]
    rest = iter(words[1:])
    for w in rest:
        if w in ("--output-json", "--tracking-uri"):   # where the figures go: here, not the user's runs/ and mlflow.db
            next(rest)
            continue
        cmd.append(w)
    return cmd + ["--set", f"run.output_dir={out}", "--no-mlflow"]


def test_the_demo_command_is_the_makefiles():
    cmd = _demo_command(Path("/x"), 1)
    assert cmd[1:] == ["--master_port", "1", "--num_gpus", "2", "--module", "ds_smoes.train", "--config",
                       "configs/demo.yaml", "--set", "run.output_dir=/x", "--no-mlflow"]


@pytest.mark.slow
def test_readme_quotes_what_make_demo_gives(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(_demo_command(out, 29653), cwd=ROOT, env=env, capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    code = demo_figures.main([str(out / "metrics.json"), "--check"])
    assert code == 0, "README.md quotes other demo figures than the demo gives now: run `make demo && make demo-figures`"
