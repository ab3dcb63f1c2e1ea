#!/usr/bin/env bash
# Run CI as CI runs it: `bash .ci/run` in a fresh clone of the committed HEAD, so nothing installed by hand or
# left untracked in this checkout can make it pass (the project needs nothing outside its repository).
#   bash ci/fresh-clone.sh [DIR]      (default DIR: a new temporary folder)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-$(mktemp -d)}"
mkdir -p "$work"
rm -rf "$work/main"
git clone -q "$repo" "$work/main"
echo "fresh clone of $(git -C "$repo" rev-parse --short HEAD) in $work/main"
cd "$work/main"
start=$(date +%s)
CI=true bash .ci/run < /dev/null
echo "CI passed in $(( $(date +%s) - start ))s"
