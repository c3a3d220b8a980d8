#!/usr/bin/env bash
# Start (or stop) a local single-node Ray cluster for `ray job submit` and `serve run`.
#   cluster/local.sh start   # head on this machine, dashboard on 127.0.0.1:8265
#   cluster/local.sh stop    # stops the Ray processes of this host
# Token authentication is on: the token lives in ~/.ray/auth_token (made once here), and
# clients of the cluster (ray job submit, serve run/deploy) must run with RAY_AUTH_MODE=token.
set -euo pipefail
case "${1:-start}" in
  start)
    ray get-auth-token --generate >/dev/null
    RAY_AUTH_MODE=token ray start --head --dashboard-host 127.0.0.1 --dashboard-port 8265 --num-cpus "${NUM_CPUS:-$(nproc)}"
    echo "export RAY_AUTH_MODE=token RAY_ADDRESS=http://127.0.0.1:8265"
    ;;
  stop)
    ray stop
    ;;
  *)
    echo "usage: $0 start|stop" >&2
    exit 2
    ;;
esac
