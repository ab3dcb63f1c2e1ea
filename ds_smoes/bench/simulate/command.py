"""Running the simulation on a benchmark result: grid, check against the measurement, files.

Kept apart from `model.py` (the pure model) and `report.py` (formatting): this is
the one place that reads a benchmark result and writes the simulation's files.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path

from ds_smoes.bench.comm.report import simulation_inputs, strict_json
from ds_smoes.bench.simulate.model import (EP_GRID, EXPERTS_GRID, monte_carlo_figures, rank_once_figures,
                                     simulate_grid)
from ds_smoes.bench.simulate.report import calibration, csv_table, figure, highlights, markdown_table, save_figure
from ds_smoes.core.errors import ConfigError

FILES = ("simulate.json", "simulate.csv", "simulate.md", "simulate.png")


def run_simulation(result: dict, out_dir: Path, source: str | None = None,
                   experts: tuple[int, ...] = EXPERTS_GRID, ep_sizes: tuple[int, ...] = EP_GRID,
                   capacity_factor: float | None = None, hidden: int | None = None,
                   element_size: int | None = None, method: str = "analytic", samples: int = 5000,
                   seed: int = 0) -> dict:
    """Simulate the grid from `result` (a comm.json), write FILES into out_dir, return the summary.

    capacity_factor replaces both measured stock capacity ratios; hidden / element_size express
    the bytes for another model width or precision (the rank figures do not depend on them)."""
    inputs, used = simulation_inputs(result, source)
    measured_inputs = inputs
    if capacity_factor is not None:
        if capacity_factor <= 0:
            raise ConfigError(f"--capacity-factor {capacity_factor}: must be > 0")
        inputs = dataclasses.replace(inputs, capacity_ratio_a=capacity_factor, capacity_ratio_b=capacity_factor)
    if hidden is not None or element_size is not None:
        if (hidden is not None and hidden < 1) or (element_size is not None and element_size < 1):
            raise ConfigError("--hidden and --element-size must be positive")
        inputs = dataclasses.replace(inputs, hidden=hidden or inputs.hidden,
                                     element_size=element_size or inputs.element_size)
    if method not in ("analytic", "monte-carlo"):
        raise ConfigError(f"--method {method!r}: choose analytic or monte-carlo")
    rank_model = rank_once_figures if method == "analytic" else partial(monte_carlo_figures, samples=samples,
                                                                         seed=seed)
    rows = simulate_grid(inputs, tuple(experts), tuple(ep_sizes), rank_model)
    if not rows:
        raise ConfigError(f"no (experts, ep_size) pair in {list(experts)} x {list(ep_sizes)} has 2 <= ep_size "
                          "<= experts with ep_size dividing experts")
    setup = result["setup"]
    summary = {
        "source": used, "method": method, "inputs": dataclasses.asdict(inputs),
        "calibration": calibration(measured_inputs, result["sources"][used], setup["num_experts"],
                                   setup["ep_size"]),
        "calibration_layout": {"num_experts": setup["num_experts"], "ep_size": setup["ep_size"]},
        "highlights": highlights(rows), "rows": rows,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "simulate.json").write_text(strict_json(summary))
    (out_dir / "simulate.csv").write_text(csv_table(rows))
    (out_dir / "simulate.md").write_text(markdown_table(rows) + "\n")
    fig = figure(rows, f"SMoES EP traffic model from the {used} routers ({method}); docs/bench.md")
    save_figure(fig, out_dir / "simulate.png")
    return summary
