#!/usr/bin/env bash
# Install (if needed) and start blockserve on the built-in demo model.
# Extra arguments go to `blockserve serve` (e.g. --model PATH_OR_HUB_ID --port 8000).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
exec .venv/bin/blockserve serve "$@"
