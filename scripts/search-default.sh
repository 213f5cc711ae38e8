#!/usr/bin/env bash
# Installs prunerzero, then runs the embedded default search (SmolLM2-135M on CPU: about half an
# hour of search plus the one-off model conversion), then its held-out check (the best two metrics
# and the baselines on the first windows of WikiText-2 test and C4 validation, about ten more),
# exports the best metrics and writes the HTML report. It ends with a verdict: did the search find
# a metric past Wanda? Run it again to resume where it stopped. SEED=N runs another search seed
# (NAME defaults to smollm2-135m, or smollm2-135m-sN with a SEED).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
SEED=${SEED:-}
NAME=${NAME:-smollm2-135m${SEED:+-s$SEED}}
if [ -f "runs/$NAME/state.json" ]; then
  prunerzero search --resume "runs/$NAME"
else
  prunerzero search --config configs/smollm2-135m.yaml --name "$NAME" ${SEED:+--seed "$SEED"}
fi
prunerzero export "runs/$NAME" --top 5 --out "runs/$NAME/export.json"
prunerzero report "runs/$NAME"
