#!/usr/bin/env bash
# Prepare ci/gpu-check.sh for a GPU machine WITHOUT network access: run this beforehand on a connected
# machine (this one), then copy the working tree with the folder to the GPU machine.
#
#   bash ci/fetch-gpu-wheels.sh        # writes .gpu-wheels/ (ignored by git), at most 40 MB
#
# The GPU machine is assumed to have Python 3.12, a CUDA PyTorch, transformers (which brings numpy, pyyaml
# and tqdm), pytest and hypothesis.  The folder holds what else `import deepspeed` and
# `python -m ds_smoes.train --no-mlflow` need, as cp312 manylinux x86_64 wheels:
#   - deepspeed 0.19.8, built here as a pure-Python wheel (PyPI ships only its sdist; DS_BUILD_OPS=0: no
#     prebuilt ops, the training needs none) and its small dependencies (hjson, py-cpuinfo, msgpack, psutil,
#     ninja, einops, packaging);
#   - pydantic 2 with pydantic-core (binary), annotated-types, typing-inspection, typing-extensions;
#   - pillow (the dataset's PNG images);
# not matplotlib: without it a run skips its heatmap PNG and says so;
# and digits/, the demo dataset generated here: its generator needs scikit-learn (and scipy), 40 MB of
# wheels, while the generated files are 1.6 MB.  Not Ray, MLflow or scikit-learn: the check needs none.
# The versions are those of the project's own environment (.venv, `make venv`), so the GPU machine runs the
# package set CI tests.  gpu-check.sh installs only what the GPU machine lacks.
#
#   PYTHON=...          the interpreter whose packages set the versions and that builds deepspeed's wheel
#                       (default .venv/bin/python; it needs torch, setuptools and scikit-learn)
#   GPU_WHEELS_DIR=...  the folder (default .gpu-wheels); it is emptied first
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${GPU_WHEELS_DIR:-.gpu-wheels}
python=${PYTHON:-.venv/bin/python}
limit_bytes=40000000   # 40 MB
deepspeed_version=0.19.8
# distributions fetched as wheels, at the versions installed in $python's environment
wheels=(pydantic pydantic-core annotated-types typing-inspection typing-extensions
        hjson py-cpuinfo msgpack psutil ninja einops packaging pillow)

if [ ! -x "$python" ]; then
    echo "error: $python not found: run 'make venv' first, or set PYTHON=/path/to/python (with torch, setuptools, scikit-learn)" >&2
    exit 1
fi
rm -rf "$dir"
mkdir -p "$dir"

echo "== versions (from $python's environment)"
pins=$("$python" - "${wheels[@]}" <<'EOF'
import importlib.metadata as md
import sys

missing = []
for name in sys.argv[1:]:
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        missing.append(name)
if missing:
    sys.exit(f"error: not installed in {sys.executable}'s environment: {', '.join(missing)}")
EOF
)
echo "$pins" | tr '\n' ' '; echo

echo "== deepspeed $deepspeed_version: building a pure-Python wheel from the sdist (no ops)"
DS_BUILD_OPS=0 "$python" -m pip wheel --quiet --no-deps --no-build-isolation --no-cache-dir \
    "deepspeed==$deepspeed_version" -w "$dir" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
ls "$dir"/deepspeed-"$deepspeed_version"-py3-none-any.whl >/dev/null

echo "== wheels for CPython 3.12, manylinux x86_64"
# shellcheck disable=SC2086
"$python" -m pip download --quiet --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$dir" $pins 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
for pin in $pins; do   # each one came (pip download may say nothing when a platform tag misses)
    name=${pin%%==*}; version=${pin##*==}
    stem=$(echo "$name" | tr 'A-Z-' 'a-z_')
    if ! ls "$dir" | tr 'A-Z-' 'a-z_' | grep -q "^${stem}_${version}_"; then
        echo "error: no cp312 manylinux x86_64 wheel of $pin in $dir" >&2
        exit 1
    fi
done

echo "== the digits dataset (seed 0), generated here"
"$python" -m ds_smoes.data.digits --out "$dir/digits" --seed 0

echo "== $dir"
(cd "$dir" && ls -l --block-size=K ./*.whl | awk '{print "  " $5 "\t" $9}')
total=$(find "$dir" -type f -printf '%s\n' | awk '{s += $1} END {print s + 0}')
wheel_bytes=$(find "$dir" -maxdepth 1 -name '*.whl' -printf '%s\n' | awk '{s += $1} END {print s + 0}')
awk -v d="$dir" -v t="$total" -v w="$wheel_bytes" -v n="$(find "$dir" -type f | wc -l)" 'BEGIN {
    printf "  %s: %.1f MB in %d files (wheels %.1f MB, digits/ %.1f MB); limit 40 MB\n", d, t / 1e6, n, w / 1e6, (t - w) / 1e6 }'
if [ "$total" -gt "$limit_bytes" ]; then
    echo "error: $dir holds $total bytes, over the limit of $limit_bytes" >&2
    exit 1
fi
echo "next: copy this working tree with $dir/ to the GPU machine and run 'bash ci/gpu-check.sh' there"
