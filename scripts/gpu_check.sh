#!/usr/bin/env bash
# The GPU checks (under 8 minutes): what the CPU cannot show. Run on a lent GPU machine from the repository root,
# with .gpu/ carried beside the checkout (see docs/gpu.md for how it is built: wheels missing from the GPU image,
# all-MiniLM-L6-v2 stored in fp16 to fit the transfer limit, the NFCorpus test split). Results go to $OUT.
set -u
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
log() { echo; echo "=== $* ($(date +%T))"; }

log "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
arrow=$(python3 -c "import pyarrow; print(pyarrow.__version__.split('.')[0])")
wheels=".gpu/whl_old/*.whl .gpu/whl/pytrec*.whl"
[ "$arrow" -ge 24 ] && wheels=".gpu/whl/*.whl"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $wheels || exit 1
export PYTHONPATH=/tmp/site:$PWD
python3 -c "import torch, transformers, accelerate, sentence_transformers, datasets; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'sentence-transformers', sentence_transformers.__version__, 'datasets', datasets.__version__)"
mkdir -p .gpu/nfcorpus && gunzip -kf .gpu/nfcorpus/corpus.jsonl.gz

log "masks on CUDA equal masks on the CPU"
timeout 120 python3 scripts/gpu_checks.py masks .gpu/minilm .gpu/nfcorpus/corpus.jsonl 2>&1 | grep -v "Loading weights"

log "pretraining throughput, CUDA bf16, batch 16 x 256 (our RetroMAE, our MLM, HF MLM)"
timeout 120 python3 scripts/bench_pretrain.py --device cuda --precision bf16 --rounds 3 --steps 10 --model .gpu/minilm 2>&1 | grep -v "Loading weights\|warn" | tee "$OUT/bench_pretrain_b16.txt"

log "encoding throughput: sentence-transformers fp32 vs ours fp32 / bf16, 2000 NFCorpus passages"
timeout 120 python3 scripts/bench_encode.py --device cuda --batch-size 128 --rounds 3 --no-compile --model .gpu/minilm --nfcorpus .gpu/nfcorpus 2>&1 | grep -v "Loading weights" | tee "$OUT/bench_encode.txt"

log "NFCorpus nDCG@10 at fp32 and bf16"
timeout 120 python3 scripts/gpu_checks.py ndcg .gpu/minilm .gpu/nfcorpus 2>&1 | grep -v "Loading weights" | tee "$OUT/ndcg.txt"
log "retromae pretrain end to end on CUDA (bf16 auto), then the export loads"
timeout 120 python3 -m retromae pretrain pretrain/demo.yaml model.name_or_path=.gpu/minilm \
  "data.corpus=[.gpu/nfcorpus/corpus.jsonl]" train.output_dir=/tmp/gpu_run train.max_steps=40 \
  train.per_device_batch_size=64 train.logging_steps=10 train.save_steps=20 2>&1 | tr '\r' '\n' | grep -a "^step\|error\|Error" | tee "$OUT/pretrain_run.txt"
python3 -c "
from sentence_transformers import SentenceTransformer
m = SentenceTransformer('/tmp/gpu_run/model', device='cuda'); v = m.encode(['a test sentence'])
print('export loads on cuda:', v.shape, m)" 2>&1 | grep -v "Loading weights" | tail -4

log "pretraining throughput, CUDA bf16, batch 64 x 256"
timeout 120 python3 scripts/bench_pretrain.py --device cuda --precision bf16 --rounds 3 --steps 5 --batch 64 --model .gpu/minilm 2>&1 | grep -v "Loading weights\|warn" | tee "$OUT/bench_pretrain_b64.txt"

log "done"
