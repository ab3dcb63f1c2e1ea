"""Sweeps on Ray: grids over bin counts, score types, gates, seeds or any training field.

    spec.py     the sweep file (pydantic), its trials            (no Ray, no MLflow)
    trial.py    one trial: a Tune function trial fitting a Ray Train TorchTrainer
    driver.py   start / resume a sweep (Ray Tune), conclude it in MLflow
    progress.py the console: one line per trial event, with done d/N and the sweep's ETA
    store.py    the sweep's MLflow queries (parent, children, attempts)
    report.py   the comparison table and figures, from MLflow
    cli.py      `python -m ds_smoes.sweep` = `python ray_jobs/sweep.py` = `ds-smoes-sweep`

The training itself is `ds_smoes.app.session.run_training`, unchanged: this package only decides
what each trial trains, where it runs and where it logs.
"""
