#!/usr/bin/env bash
# The README's test command: installs what is missing, then runs the whole suite on the
# best Vulkan device found (lavapipe on a CPU-only machine). Extra args go to pytest.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/bootstrap.sh"
cd "$root"
exec .venv/bin/python -m pytest "$@"
