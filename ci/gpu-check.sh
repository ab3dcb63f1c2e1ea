#!/usr/bin/env bash
# The GPU check (issue 17): the tests marked `cuda`, then a short single-GPU training of the demo recipe in
# bf16 over NCCL (world size 1, ep_size 1, --no-mlflow), and its figures.  Exits non-zero when a step fails.
#
# For a GPU machine WITHOUT network access that has Python 3.12, a CUDA PyTorch, transformers, pytest and
# hypothesis.  Beforehand, on a connected machine: `bash ci/fetch-gpu-wheels.sh`, then copy the working tree
# with .gpu-wheels/ to the GPU machine and, in its root:
#
#   bash ci/gpu-check.sh
#
# It installs what the machine lacks (deepspeed, pydantic, ...) from .gpu-wheels/ into .gpu-site/, put on
# PYTHONPATH with the repository: the machine's own packages, its CUDA torch first of all, stay as they are,
# and nothing fetches from a network.  It must end within 10 minutes: the training is stopped, and the check
# fails, after GPU_CHECK_TRAIN_TIMEOUT seconds.
#
#   PYTHON=python3            the interpreter with the CUDA torch
#   GPU_CHECK_EPOCHS=3        epochs of the demo recipe (153 steps of 32 conversations each)
#   GPU_CHECK_MAX_STEPS=N     stop the training after N steps (default: every step of the epochs)
#   GPU_CHECK_TRAIN_TIMEOUT=420  seconds the training may take before the check fails
#   GPU_CHECK_ALLOW_CPU=1     a rehearsal where torch sees no CUDA device: the cuda tests are skipped and the
#                             training runs on the CPU over gloo; where a CUDA device exists it changes nothing
#   OUT=DIR                   also write the results there (gpu-check.log, gpu-demo.json, the heatmap)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
py=${PYTHON:-python3}
wheels="$root/.gpu-wheels"
site="$root/.gpu-site"
results="$root/runs/gpu-check"
epochs=${GPU_CHECK_EPOCHS:-3}
train_timeout=${GPU_CHECK_TRAIN_TIMEOUT:-420}
# what the training path needs besides torch and transformers (pyproject's pins, without Ray, MLflow and
# scikit-learn, matplotlib: without it the run skips its heatmap and says so)
requirements=("deepspeed==0.19.8" "pydantic>=2.6,<3" "pillow>=10" "pyyaml>=6" "numpy>=1.26")
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

rm -rf "$results"
mkdir -p "$results" ${OUT:+"$OUT"}
exec > >(tee "$results/gpu-check.log" ${OUT:+"$OUT/gpu-check.log"}) 2>&1
if [ -n "${OUT:-}" ]; then   # the figures and the heatmap too, whatever the outcome
    trap 'cp "$results/gpu-demo.json" "$results/run/expert_modality_heatmap.png" "$OUT/" 2>/dev/null || true' EXIT
fi
t0=$(date +%s)
step() { echo; echo "== [$(( $(date +%s) - t0 ))s] $*"; }
fail() { echo "gpu-check FAILED: $*"; exit 1; }

step "machine"
"$py" - <<'EOF' || fail "no usable torch in $py"
import platform, sys, torch
print(f"python {platform.python_version()} ({sys.executable}); torch {torch.__version__}, CUDA {torch.version.cuda}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU: {torch.cuda.device_count()} x {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}")
else:
    print("GPU: none (torch.cuda.is_available() is False)")
EOF
if "$py" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    mode=cuda
elif [ "${GPU_CHECK_ALLOW_CPU:-0}" = 1 ]; then
    mode=cpu
    echo "GPU_CHECK_ALLOW_CPU=1: a rehearsal on the CPU (gloo); no GPU figure comes out of it"
else
    fail "torch sees no CUDA device (set GPU_CHECK_ALLOW_CPU=1 to rehearse on the CPU)"
fi

step "install what this machine lacks from $wheels into $site"
[ -d "$wheels" ] || fail "$wheels not found: run 'bash ci/fetch-gpu-wheels.sh' on a machine with network access and copy the folder here"
[ -f ds_configs/bf16.json ] || fail "ds_configs/bf16.json not found"
rm -rf "$site"
report="$results/pip-report.json"
# pip resolves against what is installed (a dry run: nothing changes) and names what is missing or too old;
# exactly those wheels go into $site.  PIP_BREAK_SYSTEM_PACKAGES: a dry run on a distribution's Python.
PYTHONPATH= PIP_BREAK_SYSTEM_PACKAGES=1 "$py" -m pip install --quiet --dry-run --no-index --find-links "$wheels" \
    --report "$report" "${requirements[@]}" || fail "pip cannot satisfy ${requirements[*]} from $wheels and this machine's packages"
mapfile -t files < <("$py" - "$report" <<'EOF'
import json, sys
from urllib.parse import unquote, urlparse
for item in json.load(open(sys.argv[1]))["install"]:
    print(unquote(urlparse(item["download_info"]["url"]).path))
EOF
)
if [ "${#files[@]}" -gt 0 ]; then
    "$py" -m pip install --quiet --no-index --no-deps --no-compile --target "$site" "${files[@]}" || fail "pip install into $site"
    echo "installed: $(printf '%s\n' "${files[@]##*/}" | sed -E 's/^([^-]+)-([^-]+)-.*/\1 \2/' | paste -sd, - | sed 's/,/, /g')"
else
    echo "installed: nothing (this machine has all of it)"
fi
export PYTHONPATH="$site:$root${PYTHONPATH:+:$PYTHONPATH}"
if [ -d "$site/bin" ]; then export PATH="$site/bin:$PATH"; fi   # e.g. ninja, for an op DeepSpeed compiles on first use
"$py" - <<'EOF' || fail "the training's imports"
import importlib.metadata as md
import deepspeed, pydantic, torch, transformers  # noqa: F401
import ds_smoes.app.train, ds_smoes.moe.layer  # noqa: F401
print("using: " + ", ".join(f"{n} {md.version(n)}" for n in ("torch", "deepspeed", "pydantic", "transformers", "numpy")))
EOF

step "tests marked cuda (tests/test_cuda.py)"
"$py" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py || fail "tests marked cuda"

step "training: demo recipe, bf16 (ds_configs/bf16.json), world size 1, ep_size 1, $epochs epochs${GPU_CHECK_MAX_STEPS:+ (at most $GPU_CHECK_MAX_STEPS steps)}, --no-mlflow"
data="$root/data/digits"
if [ ! -f "$data/train.json" ]; then
    data="$wheels/digits"   # generated by fetch-gpu-wheels.sh: no scikit-learn needed here
fi
train_args=(--config configs/demo.yaml --set smoes.ep_size=1 --set "run.deepspeed_config=$root/ds_configs/bf16.json"
            --set "optim.epochs=$epochs" --set "run.output_dir=$results/run"
            --set "data.train_json=$data/train.json" --set "data.val_json=$data/val.json"
            --set "data.test_json=$data/test.json" --set "data.image_folder=$data" --set data.generate_digits=false
            --no-mlflow --output-json "$results/gpu-demo.json")
if [ -n "${GPU_CHECK_MAX_STEPS:-}" ]; then train_args+=(--set "optim.max_steps=$GPU_CHECK_MAX_STEPS"); fi
echo "python -m ds_smoes.train ${train_args[*]}"
# ds_smoes.train's main, then what it ran on: the process group's backend, the GPU memory it used and the dtype
# of the weights it saved (DeepSpeed's bf16 mode keeps the model in bf16, fp32 master weights in the optimizer)
GPU_CHECK_MODE=$mode timeout --signal=INT --kill-after=30 "$train_timeout" "$py" - "${train_args[@]}" <<'EOF' \
    || fail "training (exit status $?; 124: over GPU_CHECK_TRAIN_TIMEOUT=${train_timeout}s)"
import collections, json, os, sys
from pathlib import Path

import torch
import torch.distributed as dist

from ds_smoes.app.train import main

rc = main(sys.argv[1:])
if rc:
    sys.exit(rc)
out = Path(sys.argv[sys.argv.index("--output-json") + 1])
figures = json.loads(out.read_text())
cuda = torch.cuda.is_available()
dtypes = collections.Counter()
for states in Path(figures.get("checkpoint") or "-").glob("*/mp_rank_00_model_states.pt"):
    module = torch.load(states, map_location="cpu", weights_only=False)["module"]   # our own checkpoint
    dtypes.update(str(t.dtype).removeprefix("torch.") for t in module.values() if t.is_floating_point())
figures["gpu_check"] = ran = {
    "mode": os.environ["GPU_CHECK_MODE"],
    "backend": dist.get_backend() if dist.is_initialized() else None,
    "world_size": dist.get_world_size() if dist.is_initialized() else 1,
    "torch": torch.__version__, "cuda": torch.version.cuda,
    "gpu": torch.cuda.get_device_name(0) if cuda else None,
    "gpu_peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
    "weights_dtype": dtypes.most_common(1)[0][0] if dtypes else None,
}
out.write_text(json.dumps(figures, indent=2))
if ran["weights_dtype"] != "bfloat16":
    sys.exit(f"gpu-check: the saved weights are {ran['weights_dtype']}, expected bfloat16 (ds_configs/bf16.json)")
if ran["mode"] == "cuda" and (ran["backend"] != "nccl" or not ran["gpu_peak_memory_mb"]):
    sys.exit(f"gpu-check: the training ran on backend {ran['backend']} with {ran['gpu_peak_memory_mb']} MiB of GPU "
             "memory: expected NCCL and the model on the GPU")
EOF

step "figures"
"$py" - "$results/gpu-demo.json" <<'EOF'
import json, sys
f = json.load(open(sys.argv[1]))
g = f["gpu_check"]
def show(label, value):
    print(f"  {label:<34} {value}")
show("accuracy, multimodal / language", f"{f['acc_multimodal']:.4f} / {f['acc_language']:.4f}")
show("MSI", f"{f['msi']:.3f}")
show("training throughput", f"{f['tokens_per_s']:,.0f} tokens/s ({f['steps']} steps)")
show("wall time (training run)", f"{f['wall_seconds']:.0f} s")
show("device", g["gpu"] or "CPU (rehearsal)")
show("torch / CUDA", f"{g['torch']} / {g['cuda']}")
show("backend, world size", f"{g['backend']}, {g['world_size']}")
show("weights (saved checkpoint)", g["weights_dtype"])
if g["gpu_peak_memory_mb"] is not None:
    show("peak GPU memory", f"{g['gpu_peak_memory_mb']:.0f} MiB")
EOF
echo "gpu-check passed in $(( $(date +%s) - t0 ))s ($mode)"
