#!/usr/bin/env bash
# The MLflow UI in a real browser (ci/mlflow_ui_check.py says what it checks):
#   bash ci/mlflow-ui-check.sh [sqlite:////ABS/PATH/mlflow.db] [OUT_DIR]
# Installs Debian's chromium (as root, when /usr/bin/chromium is missing) and the playwright package (its Python
# driver only: the browser is Debian's) into the project's virtualenv (make venv first).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || { echo "no .venv: run make venv first" >&2; exit 2; }
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "needs Debian's chromium (/usr/bin/chromium): sudo apt-get install chromium" >&2; exit 2
  fi
fi
"$PY" -c "import playwright" 2>/dev/null || "$PY" -m pip install -q "playwright>=1.50"
exec "$PY" ci/mlflow_ui_check.py "${1:-sqlite:///$PWD/mlflow.db}" "${2:-runs/mlflow-ui-check}"
