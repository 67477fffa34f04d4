#!/bin/sh
# Start the Node.js pipeline from a fresh clone: install its locked dependencies
# on first use, then hand over to node (same PID, so signals reach it directly).
#   ./run.sh --broker mqtt://127.0.0.1:1883 --topic 'plant/+/telemetry' --out ./out
set -e
here=$(cd "$(dirname "$0")" && pwd)
if [ ! -d "$here/node_modules" ]; then
    (cd "$here" && npm ci --silent --no-audit --no-fund) >&2
fi
exec node "$here/pipeline.js" "$@"
