#!/usr/bin/env bash
# The main job: Redis, the reward server with the embedded judge, a /pairwise and a /winrate question,
# then two GRPO trainer jobs sharing the judge through Redis (see scripts/stack.py).
set -euo pipefail
cd "$(dirname "$0")/.."
[[ " $* " == *" --judges "* ]] || export HF_HUB_OFFLINE=1  # real judges may come from the hub
exec .venv/bin/python scripts/stack.py "$@"
