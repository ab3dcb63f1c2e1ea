"""The figures README quotes for `make demo`, rendered from a run's metrics.json, so they come from the code.

    python ci/demo_figures.py runs/demo/metrics.json            # print the block
    python ci/demo_figures.py runs/demo/metrics.json --write    # rewrite it in README.md (make demo-figures)
    python ci/demo_figures.py runs/demo/metrics.json --check    # exit 1 if README.md quotes other figures
    python ci/demo_figures.py --run-demo runs/docs-check --check   # run the demo's command first (make docs-check)

The block sits between the markers BEGIN and END in README.md.  Only what the demo determines is in it
(seed 0, 2 CPU ranks: the run is deterministic on one machine); throughput and wall time depend on the
machine's speed and stay out.  The floats of a 1,900-step run also depend on the CPU (other kernels, another
summation order), so the block names the machine that wrote it, and `--check` on another machine says that
this is why it differs.  `make docs-check` runs the exact check; the test suite checks only what must hold
on any machine (tests/test_demo_figures.py).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BEGIN = "<!-- demo-figures: begin (ci/demo_figures.py writes this block from runs/demo/metrics.json) -->"
END = "<!-- demo-figures: end -->"


def machine() -> str:
    """What decides a run's floats on this machine: the CPU model, the kernels torch picks for it, and whether
    it computes bf16 natively (e.g. "AMD EPYC, torch CPU kernels AVX512, native bf16")."""
    import torch

    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    bf16 = "native bf16" if re.search(r"\b(avx512_bf16|amx_bf16)\b", cpuinfo) else "no native bf16"
    return f"{model.group(1).strip() if model else 'unknown CPU'}, torch CPU kernels " \
           f"{torch.backends.cpu.get_cpu_capability()}, {bf16}"


def render(m: dict, on: str | None = None) -> str:
    """The README block for the metrics of a demo run, measured on machine `on` (pure)."""
    per_layer = ", ".join(f"{v:.3f}" for v in m["msi_per_layer"])
    where = f"; {on}" if on else ""
    lines = [
        f"| figure (test split, seed {m['seed']}, {m['world_size']} CPU ranks, {m['steps']} steps{where}) | value |",
        "|---|---|",
        f"| accuracy, multimodal questions | {m['acc_multimodal']:.4f} ({m['num_test_multimodal']} questions) |",
        f"| accuracy, language-only questions | {m['acc_language']:.4f} ({m['num_test_language']} questions) |",
        f"| accuracy, overall | {m['acc_overall']:.4f} |",
        f"| modality specialisation index (MSI) | {m['msi']:.3f} (per MoE layer {per_layer}) |",
        f"| cross-rank rate, bins placed on EP ranks | {m['cross_rank_rate']:.3f} |",
        f"| ranks per token, bins placed on EP ranks | {m['ranks_per_token']:.3f} |",
        f"| cross-rank rate, where the experts are | {m['cross_rank_rate_physical']:.3f} |",
        f"| remote bytes per token and MoE layer, {m['dispatch']} dispatch | {m['bytes_per_token']:.0f} |",
    ]
    if m.get("stock_bytes_per_token"):
        saving = 100.0 * (m["bytes_per_token"] - m["stock_bytes_per_token"]) / m["stock_bytes_per_token"]
        lines.append(f"| the same routes through DeepSpeed's stock dispatch | {m['stock_bytes_per_token']:.0f} "
                     f"({saving:+.1f} % for {m['dispatch']}) |")
    lines.append(f"| test loss | {m['test_loss']:.4f} |")
    return "\n".join(lines)


def block(text: str) -> str:
    """The current block of README text (without the markers)."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise SystemExit(f"{README}: the markers {BEGIN!r} ... {END!r} are missing")
    return text[start + len(BEGIN):end].strip("\n")


def replace(text: str, new_block: str) -> str:
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise SystemExit(f"{README}: the markers {BEGIN!r} ... {END!r} are missing")
    return text[:start + len(BEGIN)] + "\n" + new_block + "\n" + text[end:]


def demo_command(out: Path, port: int, tracking_uri: str | None = None) -> list[str]:
    """The Makefile's `demo` command (its deepspeed line), with the launcher of this interpreter's environment,
    its outputs redirected: run.output_dir `out`, MLflow to `tracking_uri` (None: no MLflow run)."""
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^demo: .*\n((?:\t.*\n)+)", makefile, re.M).group(1)
    words = recipe.replace("\\\n", " ").splitlines()[0].split()
    if words[0] != "$(VENV)/bin/deepspeed":
        raise SystemExit(f"Makefile: the demo target no longer starts with $(VENV)/bin/deepspeed: {words}")
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--master_port", str(port)]
    rest = iter(words[1:])
    for w in rest:
        if w in ("--output-json", "--tracking-uri", "--master_port"):   # `out`, not runs/ and mlflow.db; `port`
            next(rest)
            continue
        cmd.append(w)
    mlflow = ["--tracking-uri", tracking_uri] if tracking_uri else ["--no-mlflow"]
    return cmd + ["--set", f"run.output_dir={out}", *mlflow]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_demo(out: Path) -> Path:
    """Run the demo's command into `out` (its output on this console); the metrics.json it wrote."""
    cmd = demo_command(out.resolve(), free_port())
    print("running the demo:", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    if proc.returncode != 0:
        raise SystemExit(f"the demo failed (exit {proc.returncode}); its output is above")
    return out / "metrics.json"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("metrics", type=Path, nargs="?",
                   help="metrics.json of a demo run (make demo writes runs/demo/metrics.json)")
    p.add_argument("--run-demo", type=Path, metavar="DIR", help="run the demo's command into DIR first and use its "
                   "metrics.json (what `make docs-check` does)")
    p.add_argument("--readme", type=Path, default=README)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="rewrite the block in README.md")
    mode.add_argument("--check", action="store_true", help="exit 1 when README.md quotes other figures")
    args = p.parse_args(argv)
    if (args.metrics is None) == (args.run_demo is None):
        p.error("give a metrics.json or --run-demo DIR (one of them)")
    metrics = run_demo(args.run_demo) if args.run_demo else args.metrics
    if not metrics.is_file():
        print(f"error: {metrics}: no metrics.json; run `make demo` first", file=sys.stderr)
        return 2
    here = machine()
    new = render(json.loads(metrics.read_text()), here)
    text = args.readme.read_text()
    if args.write:
        args.readme.write_text(replace(text, new))
        print(f"wrote the demo figures of {metrics} into {args.readme}")
    elif args.check:
        old = block(text)
        if old != new:
            why = ""
            if here not in old.splitlines()[0]:
                why = (f"\nREADME's figures were measured on another machine ({old.splitlines()[0]}); this is {here}. "
                       "Floats of a 1,900-step run differ between CPUs: re-measure with `make demo && "
                       "make demo-figures` on the machine whose figures README should quote.")
            print(f"{args.readme} quotes other demo figures than {metrics}; run `make demo-figures`.{why}\n"
                  f"README has:\n{old}\n\nthe run gives:\n{new}", file=sys.stderr)
            return 1
        print(f"{args.readme}: the demo figures match {metrics} ({here})")
    else:
        print(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
