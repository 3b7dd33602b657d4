#!/usr/bin/env bash
# The README's train command: installs what is missing, then trains a small byte-level GPT
# on the best Vulkan device found. Extra args go to examples/train_gpt.py.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/bootstrap.sh"
cd "$root"
exec .venv/bin/python examples/train_gpt.py "$@"
