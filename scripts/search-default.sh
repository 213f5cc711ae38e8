#!/usr/bin/env bash
# Installs prunerzero, then runs the embedded default search (SmolLM2-135M on CPU, about 10 min plus the one-off model conversion),
# exports the best metrics and prunes the model with the best one (quick perplexity check).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
NAME=${NAME:-smollm2-135m}
if [ -f "runs/$NAME/state.json" ]; then
  prunerzero search --resume "runs/$NAME"
else
  prunerzero search --config configs/smollm2-135m.yaml --name "$NAME"
fi
prunerzero export "runs/$NAME" --top 5 --out "runs/$NAME/export.json"
prunerzero prune --method tree --tree "runs/$NAME/export.json" --sparsity 0.5 --nsamples 8 --seqlen 1024 \
  --max-eval-windows 8 --json "runs/$NAME/best_pruned.json"
