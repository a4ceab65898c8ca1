#!/usr/bin/env bash
# Why does fine-tuning all-MiniLM-L6-v2 on NFCorpus help so little? A few variants of finetune/nfcorpus_small.yaml,
# each trained on the GPU (bf16) and scored on NFCorpus test (fp32, exact search), after `gpu_check.sh` set-up.
# Needs .gpu/ (see docs/gpu.md) with nfcorpus_mined.jsonl (mined on the CPU: scripts/finetune_nfcorpus.sh).
set -u
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
arrow=$(python3 -c "import pyarrow; print(pyarrow.__version__.split('.')[0])")
wheels=".gpu/whl_old/*.whl .gpu/whl/pytrec*.whl"; [ "$arrow" -ge 24 ] && wheels=".gpu/whl/*.whl"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $wheels || exit 1
export PYTHONPATH=/tmp/site:$PWD
gunzip -kf .gpu/nfcorpus/corpus.jsonl.gz
common="model.name_or_path=.gpu/minilm data.corpus=.gpu/nfcorpus dev.dataset=null train.logging_steps=1000"
variant() {  # name, overrides...
  local name=$1; shift
  timeout 100 python3 -m retromae finetune finetune/nfcorpus_small.yaml $common train.output_dir=/tmp/v_$name "$@" \
    2>&1 | tr '\r' '\n' | grep -a "^step\|rror" | tail -1 | sed "s/^/$name: /"
  timeout 60 python3 scripts/gpu_checks.py ndcg-fp32 /tmp/v_$name/model .gpu/nfcorpus 2>&1 | grep "^ndcg" | sed "s/^/$name: /"
}
{
variant recipe data.train=.gpu/nfcorpus_mined.jsonl
variant in_batch_only data.train=.gpu/nfcorpus_mined.jsonl data.group_size=1
variant group8 data.train=.gpu/nfcorpus_mined.jsonl data.group_size=8
variant lr5e-5_3epochs data.train=.gpu/nfcorpus_mined.jsonl train.lr=5e-5 train.epochs=3
variant temp0.02 data.train=.gpu/nfcorpus_mined.jsonl loss.temperature=0.02
} | tee "$OUT/variants.txt"
