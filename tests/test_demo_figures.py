"""README's table of `make demo` figures comes from the code: ci/demo_figures.py renders it from a run's
metrics.json (pinned here by hand) and names the machine that measured it.  The exact figures are checked by
`make docs-check` on the machine that wrote them: the floats of a 1,900-step run differ between CPUs.  Here, a
slow test runs the demo's own command (the Makefile's, outputs redirected) and checks what must hold on any
machine: accuracy floors, specialisation, rank_once sending less than DeepSpeed's stock dispatch, and the table
rendered from its metrics.json."""
import json
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
    text = demo_figures.render(METRICS, "Some CPU, torch CPU kernels AVX2, no native bf16")
    assert text.splitlines()[0] == ("| figure (test split, seed 0, 2 CPU ranks, 1900 steps; Some CPU, torch CPU "
                                    "kernels AVX2, no native bf16) | value |")
    assert "| accuracy, multimodal questions | 0.9526 (359 questions) |" in text
    assert "| modality specialisation index (MSI) | 0.745 (per MoE layer 0.774, 0.717) |" in text
    assert "| remote bytes per token and MoE layer, rank_once dispatch | 300 |" in text
    assert "| the same routes through DeepSpeed's stock dispatch | 601 (-50.0 % for rank_once) |" in text
    no_stock = demo_figures.render({**METRICS, "dispatch": "deepspeed", "stock_bytes_per_token": None})
    assert "stock dispatch |" not in no_stock
    assert no_stock.splitlines()[0] == "| figure (test split, seed 0, 2 CPU ranks, 1900 steps) | value |"


def test_machine_names_the_cpu_and_its_kernels():
    import torch

    here = demo_figures.machine()
    assert f"torch CPU kernels {torch.backends.cpu.get_cpu_capability()}, " in here
    assert here.endswith(("native bf16", "no native bf16"))


def test_write_then_check_round_trip(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{demo_figures.BEGIN}\nold figures\n{demo_figures.END}\noutro\n")
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps(METRICS))
    assert demo_figures.main([str(metrics), "--readme", str(readme), "--check"]) == 1
    assert demo_figures.main([str(metrics), "--readme", str(readme), "--write"]) == 0
    assert demo_figures.main([str(metrics), "--readme", str(readme), "--check"]) == 0
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old figures" not in text
    assert demo_figures.machine() in text
    # the same figures from another machine: the check fails and says why
    readme.write_text(text.replace(demo_figures.machine(), "Another CPU, torch CPU kernels AVX2, no native bf16"))
    capsys.readouterr()
    assert demo_figures.main([str(metrics), "--readme", str(readme), "--check"]) == 1
    err = capsys.readouterr().err
    assert "measured on another machine" in err and "Floats of a 1,900-step run differ between CPUs" in err


def test_the_arguments_name_one_source_of_figures(capsys):
    with pytest.raises(SystemExit) as exc:
        demo_figures.main(["--check"])
    assert exc.value.code == 2 and "give a metrics.json or --run-demo DIR" in capsys.readouterr().err
    assert demo_figures.main([str(ROOT / "no" / "metrics.json")]) == 2
    assert "run `make demo` first" in capsys.readouterr().err


def test_readme_has_the_block():
    demo_figures.block((ROOT / "README.md").read_text())   # raises when the markers are missing


def test_the_demo_command_is_the_makefiles():
    cmd = demo_figures.demo_command(Path("/x"), 1)
    assert cmd[1:] == ["--master_port", "1", "--num_gpus", "2", "--module", "ds_smoes.train", "--config",
                       "configs/demo.yaml", "--set", "run.output_dir=/x", "--no-mlflow"]
    assert demo_figures.demo_command(Path("/x"), 1, "sqlite:////t/m.db")[-2:] == ["--tracking-uri", "sqlite:////t/m.db"]


@pytest.mark.slow
def test_the_demo_gives_what_must_hold_on_any_machine(demo_run):
    """Floors, not figures: the demo's figures on three machines (an AVX2 Intel, an AVX-512/AMX Xeon, an AVX-512
    EPYC) were the same accuracies, MSI 0.64-0.75, rank_once 328-349 bytes against the stock dispatch's
    592-654.  The floors sit well below what every machine gave and well above what an untrained or
    unspecialised model gives (multimodal chance about 0.25, MSI about 0, rank_once = stock when every token
    crosses to every rank)."""
    m = demo_run.metrics
    out = demo_run.proc.stdout
    assert "== results (held-out test split)" in out, out[-3000:]
    assert "placement at step 150 (bins frozen): moved" in out, out[-3000:]
    assert m["steps"] == 1900 and m["world_size"] == 2 and m["dispatch"] == "rank_once"
    assert m["acc_multimodal"] >= 0.85 and m["acc_language"] >= 0.97, (m["acc_multimodal"], m["acc_language"])
    assert m["msi"] >= 0.4 and min(m["msi_per_layer"]) >= 0.3, (m["msi"], m["msi_per_layer"])
    # the experts sit on their bins' ranks: the physical figure is the binned one
    assert m["cross_rank_rate_physical"] == pytest.approx(m["cross_rank_rate"])
    assert 0.0 < m["cross_rank_rate"] < 0.9 and 1.0 < m["ranks_per_token"] < 1.6
    # rank_once sends each token once per rank, without padding: at most 3/4 of the stock dispatch's bytes
    assert 0 < m["bytes_per_token"] <= 0.75 * m["stock_bytes_per_token"], m
    assert m["test_loss"] < 0.5
    # README's table renders from this run's metrics.json
    table = demo_figures.render(m, demo_figures.machine())
    assert f"| accuracy, multimodal questions | {m['acc_multimodal']:.4f} (359 questions) |" in table
    assert f"| remote bytes per token and MoE layer, rank_once dispatch | {m['bytes_per_token']:.0f} |" in table
