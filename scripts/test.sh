#!/usr/bin/env bash
# The README's test command: installs what is missing, then runs the whole suite on the
# best Vulkan device found (lavapipe on a CPU-only machine). Extra args go to pytest.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/bootstrap.sh"
cd "$root"
# CI also checks parity with PyTorch: the CI machine has a local CPU wheel of torch 2.13.0.
# A user's plain run needs no PyTorch (those tests are skipped, with the reason shown).
if [ "${CI:-}" = "true" ] && ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q torch==2.13.0 || echo "[test] torch not installable"
fi
exec .venv/bin/python -m pytest -rs "$@"
