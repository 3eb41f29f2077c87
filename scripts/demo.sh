#!/usr/bin/env bash
# The main job: start the reward server with the embedded judge, ask it a real /pairwise and
# /winrate question, print the answers, stop the server.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
PORT="${REFEREE_PORT:-8000}"
LOG="${TMPDIR:-/tmp}/referee-demo-server.log"

.venv/bin/referee serve --port "$PORT" >"$LOG" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
echo "starting the reward server (embedded SmolLM2 judge) on port $PORT; log: $LOG"
.venv/bin/python scripts/demo.py --url "http://127.0.0.1:$PORT"
