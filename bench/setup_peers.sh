#!/usr/bin/env bash
# Create bench/.venv-peers: the peer systems taskfarm is compared with.
#   ipyparallel, dask[distributed], cloudpickle (required), ray (optional:
#   if it does not install in time, the peers bench skips it and says so).
# Every install step is bounded by `timeout`.  Idempotent: a venv that
# already imports the required packages is left alone.
set -u
cd "$(dirname "$0")"
PY=${PEERS_PYTHON:-python3}
VENV=.venv-peers
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import ipyparallel, distributed, cloudpickle" 2>/dev/null; then
  echo "setup_peers: $VENV ready"
  exit 0
fi
set -e
[ -x "$VENV/bin/python" ] || timeout 120 "$PY" -m venv "$VENV"
timeout 300 "$VENV/bin/pip" install -q --upgrade pip
timeout 600 "$VENV/bin/pip" install -q ipyparallel "dask[distributed]" cloudpickle
set +e
if ! timeout 400 "$VENV/bin/pip" install -q ray; then
  echo "setup_peers: ray did not install; the peers bench will skip it" >&2
fi
"$VENV/bin/python" -c "import ipyparallel, distributed, cloudpickle" || { echo "setup_peers: required packages missing" >&2; exit 1; }
echo "setup_peers: $VENV ready"
