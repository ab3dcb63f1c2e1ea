"""The figures README quotes for `make demo`, rendered from a run's metrics.json, so they come from the code.

    python ci/demo_figures.py runs/demo/metrics.json            # print the block
    python ci/demo_figures.py runs/demo/metrics.json --write    # rewrite it in README.md (make demo-figures)
    python ci/demo_figures.py runs/demo/metrics.json --check    # exit 1 if README.md quotes other figures

The block sits between the markers BEGIN and END in README.md.  Only what the demo determines
(seed 0, 2 CPU ranks: the run is deterministic) is in it; throughput and wall time depend on the
machine and stay out.  tests/test_demo_figures.py runs the demo's command and checks README.md
against its metrics.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BEGIN = "<!-- demo-figures: begin (ci/demo_figures.py writes this block from runs/demo/metrics.json) -->"
END = "<!-- demo-figures: end -->"


def render(m: dict) -> str:
    """The README block for the metrics of a demo run (pure)."""
    per_layer = ", ".join(f"{v:.3f}" for v in m["msi_per_layer"])
    lines = [
        f"| figure (test split, seed {m['seed']}, {m['world_size']} CPU ranks, {m['steps']} steps) | value |",
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("metrics", type=Path, help="metrics.json of a demo run (make demo writes runs/demo/metrics.json)")
    p.add_argument("--readme", type=Path, default=README)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="rewrite the block in README.md")
    mode.add_argument("--check", action="store_true", help="exit 1 when README.md quotes other figures")
    args = p.parse_args(argv)
    if not args.metrics.is_file():
        print(f"error: {args.metrics}: no metrics.json; run `make demo` first", file=sys.stderr)
        return 2
    new = render(json.loads(args.metrics.read_text()))
    text = args.readme.read_text()
    if args.write:
        args.readme.write_text(replace(text, new))
        print(f"wrote the demo figures of {args.metrics} into {args.readme}")
    elif args.check:
        if block(text) != new:
            print(f"{args.readme} quotes other demo figures than {args.metrics}; run `make demo-figures`.\n"
                  f"README has:\n{block(text)}\n\nthe run gives:\n{new}", file=sys.stderr)
            return 1
        print(f"{args.readme}: the demo figures match {args.metrics}")
    else:
        print(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
