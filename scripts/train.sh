#!/usr/bin/env bash
# The README's train command: installs what is missing, then trains on the best Vulkan
# device found. Extra args go to the example script.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/bootstrap.sh"
cd "$root"
exec .venv/bin/python examples/train_mlp.py "$@"
