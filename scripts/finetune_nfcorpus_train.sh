#!/usr/bin/env bash
# Fine-tuning and test scoring only (the zero-shot score and the mined negatives from scripts/finetune_nfcorpus.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
RETROMAE=${RETROMAE:-.venv/bin/retromae}
$RETROMAE finetune finetune/nfcorpus_small.yaml "$@"
$RETROMAE evaluate --model runs/finetune_nfcorpus/model --dataset ../shared/data/beir/nfcorpus --split test \
    --passage-max-len 256 --query-max-len 64 --output runs/nfcorpus_finetuned.json
