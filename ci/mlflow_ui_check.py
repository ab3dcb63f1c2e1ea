"""What a user sees in the MLflow UI, checked in a real browser (headless Chromium driven by Playwright).

    bash ci/mlflow-ui-check.sh [sqlite:////ABS/PATH/mlflow.db] [OUT_DIR]

(the shell script installs what it needs and runs this file with the project's interpreter).  Against a store that
`make demo` (or any training run) filled, it starts `mlflow ui` on a free port and, in a fresh browser profile:

1. opens the experiment list and clicks the first model-training experiment, as a new user would: where it lands;
2. opens `runs_table_url` (the link `make mlflow-ui` and every training run print): the runs table must show, in
   Model-training mode, one row per run and the headline columns (`HEADLINE_METRICS`, `HEADLINE_PARAMS`);
3. clicks the experiment in the list again: whether the browser now remembers Model-training mode;
4. opens the charts link (the comparison view).

Screenshots `1-experiment-click.png` ... `4-charts.png` go to OUT_DIR; the findings are printed.  Exit 1 when step 2
does not show the runs table with the headline columns.  Not part of `make test` (it needs Debian's chromium and
the playwright package, which the shell script installs): run it after a change to `ds_smoes/app/tracking.py` or an
MLflow upgrade.
"""
from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, seconds: float = 60.0) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"mlflow ui did not answer at {url} within {seconds:.0f}s")


def main(argv: list[str]) -> int:
    import mlflow
    from playwright.sync_api import sync_playwright

    from ds_smoes.app.tracking import (EXPERIMENT_KIND_TAG, HEADLINE_METRICS, HEADLINE_PARAMS, MODEL_TRAINING_KIND,
                                       default_tracking_uri, experiment_id, runs_table_url)

    uri = argv[0] if argv else default_tracking_uri()
    out = Path(argv[1] if len(argv) > 1 else "runs/mlflow-ui-check")
    out.mkdir(parents=True, exist_ok=True)
    client = mlflow.MlflowClient(uri)
    exps = [e for e in client.search_experiments() if e.tags.get(EXPERIMENT_KIND_TAG) == MODEL_TRAINING_KIND
            and client.search_runs([e.experiment_id], max_results=1)]
    if not exps:
        raise SystemExit(f"no model-training experiment with runs in {uri}: run `make demo` first")
    exp = next((e for e in exps if e.name == "ds-smoes"), exps[0])
    experiment_id(client, exp.name)   # the headline view, on a store older than it
    runs = client.search_runs([exp.experiment_id])
    port = free_port()
    ui = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
                              "--port", str(port), "--workers", "1"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    findings: list[str] = []
    ok = True
    try:
        wait_for(ui)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            context = browser.new_context(viewport={"width": 2800, "height": 1000})
            page = context.new_page()

            def click_experiment(shot: str) -> str:
                page.goto(f"{ui}/#/experiments")
                page.wait_for_timeout(3000)
                page.get_by_role("link", name=exp.name, exact=True).first.click()
                page.wait_for_url(lambda url: f"/experiments/{exp.experiment_id}" in url, timeout=20000,
                                  wait_until="commit")
                page.wait_for_timeout(4000)
                page.screenshot(path=str(out / shot))
                return page.url.removeprefix(ui)

            landed = click_experiment("1-experiment-click.png")
            findings.append(f"1. a fresh browser clicking {exp.name!r} in the experiment list lands on {landed}")

            page.goto(runs_table_url(exp.experiment_id, ui))
            page.wait_for_timeout(6000)
            page.screenshot(path=str(out / "2-headline-runs-table.png"))
            headers = page.locator("[role=columnheader]").all_inner_texts()
            text = page.inner_text("body")
            missing = [c for c in (*HEADLINE_METRICS, *HEADLINE_PARAMS)
                       if not any(h.strip().startswith(c[:14]) for h in headers)]
            shown = sum(1 for r in runs if (r.info.run_name or "")[:12] in text)
            findings.append(f"2. {runs_table_url(exp.experiment_id, ui)} shows the runs table "
                            f"({'Runs' in text and 'Model training' in text}), {shown} of {len(runs)} run names, "
                            f"columns {[h.strip() for h in headers if h.strip()]}"
                            + (f"; MISSING headline columns {missing}" if missing else ""))
            ok = "Runs" in text and not missing and shown > 0

            page.close()   # a new tab of the same browser (its remembered settings): the list, the same click
            page = context.new_page()
            landed = click_experiment("3-experiment-click-again.png")
            findings.append(f"3. the same browser, in a new tab, clicking {exp.name!r} in the list lands on {landed}")

            page.goto(runs_table_url(exp.experiment_id, ui, charts=True))
            page.wait_for_timeout(6000)
            page.screenshot(path=str(out / "4-charts.png"))
            findings.append(f"4. the charts link lands on {page.url.removeprefix(ui)}")
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    print("\n".join(findings))
    print(f"screenshots in {out}/; {'OK' if ok else 'FAILED: the headline link does not show the runs table'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
