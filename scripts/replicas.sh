#!/usr/bin/env bash
# N blockserve replicas behind vllm-router's cache-aware policy, on one host.
#   bash scripts/replicas.sh [N] [blockserve serve flags...]
# Replicas listen on 127.0.0.1:8001.. (BLOCKSERVE_REPLICA_PORT), the router on :8000
# (BLOCKSERVE_ROUTER_PORT). Ctrl-C drains the replicas and stops everything.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
n=${1:-2}
shift || true
base=${BLOCKSERVE_REPLICA_PORT:-8001}
router_port=${BLOCKSERVE_ROUTER_PORT:-8000}
pids=()
urls=()
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true; wait' EXIT
for i in $(seq 0 $((n - 1))); do
    port=$((base + i))
    .venv/bin/blockserve serve --port "$port" "$@" &
    pids+=($!)
    urls+=("http://127.0.0.1:$port")
done
for url in "${urls[@]}"; do
    until curl -sf "$url/health" >/dev/null; do sleep 0.5; done
done
# cache_aware asks each replica's /v1/chat/completions/render for a request's token ids
# and keeps a prefix on the replica that computed it; it forwards /v1/messages too.
.venv/bin/vllm-router --host 127.0.0.1 --port "$router_port" --policy cache_aware \
    --worker-urls "${urls[@]}" &
pids+=($!)
wait
