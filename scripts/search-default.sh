#!/usr/bin/env bash
# Installs prunerzero, then runs the embedded default search (SmolLM2-135M on CPU, about ten minutes
# plus the one-off model conversion), then its held-out check: the best two metrics and the
# baselines on the first windows of WikiText-2 test and C4 validation (about ten more; resumable),
# and exports the best metrics. Run it again to resume where it stopped.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
NAME=${NAME:-smollm2-135m}
if [ -f "runs/$NAME/state.json" ]; then
  prunerzero search --resume "runs/$NAME"
else
  prunerzero search --config configs/smollm2-135m.yaml --name "$NAME"
fi
prunerzero export "runs/$NAME" --top 5 --out "runs/$NAME/export.json"
