#!/usr/bin/env bash
# Start or stop a one-node Ray cluster on loopback, for `pinnerformer embed --engine ray --ray-address ADDR`.
# (Without --ray-address the embed job starts and stops its own local cluster; this is for a long-lived one.)
# Usage: bash scripts/ray_cluster.sh start|stop     env: PORT (6390), CPUS (all), RAY (.venv/bin/ray)
# Ray's `ray start` enables token authentication: clients need RAY_AUTH_MODE=token (the token is in ~/.ray).
set -euo pipefail
RAY=${RAY:-.venv/bin/ray}
PORT=${PORT:-6390}
CPUS=${CPUS:-$(nproc)}
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
case "${1:-}" in
  start)
    "$RAY" start --head --node-ip-address 127.0.0.1 --port "$PORT" --num-cpus "$CPUS" \
      --include-dashboard false --disable-usage-stats >&2
    echo "127.0.0.1:$PORT"
    ;;
  stop)
    "$RAY" stop >&2
    ;;
  *)
    echo "usage: $0 start|stop" >&2
    exit 2
    ;;
esac
