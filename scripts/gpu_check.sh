#!/usr/bin/env bash
# The GPU checks (under 8 minutes): what the CPU cannot show. Run on a lent GPU machine from the repository root,
# with .gpu/ carried beside the checkout (see docs/gpu.md for how it is built: wheels missing from the GPU image,
# all-MiniLM-L6-v2 stored in fp16 to fit the transfer limit, the NFCorpus test split). Results go to $OUT.
# Arguments pick sections (default: search encode-cache prep32 deterministic memory study, under 8 minutes):
# foundation (masks, pretraining and encoding throughput, nDCG at fp32 and bf16, an end-to-end run), objectives
# (every objective's throughput), finetune (MiniLM fine-tuned on NFCorpus), search (the torch search backend against
# the CPU, queries/s at 1M x 768), encode-cache (encoding with the corpus tokenized once, vs sentence-transformers),
# prep32 (RetroMAE's batch-preparation share at batch 32), deterministic (an interrupted run resumed with
# train.deterministic gives the uninterrupted weights), memory (BERT-base shape, 32 x 512, bf16: every objective's
# peak memory and samples/s), study (the short GPU study: MiniLM, local collections).
set -u
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
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

sections=${*:-search encode-cache prep32 deterministic memory study}
want() { [[ " $sections " == *" $1 "* ]]; }

if want foundation; then
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
timeout 120 python3 scripts/bench_pretrain.py --device cuda --precision bf16 --rounds 3 --steps 3 --batch 64 --model .gpu/minilm 2>&1 | grep -v "Loading weights\|warn" | tee "$OUT/bench_pretrain_b64.txt"

fi

if want objectives; then
log "every objective's throughput, CUDA bf16, batch 16 x 256"
timeout 240 python3 scripts/bench_pretrain.py --device cuda --precision bf16 --rounds 3 --steps 5 --objectives all \
  --model .gpu/minilm --markdown "$OUT/bench_objectives.md" 2>&1 | grep -v "Loading weights\|warn" | tee "$OUT/bench_objectives.txt"
fi

if want finetune; then
log "fine-tuning all-MiniLM-L6-v2 on NFCorpus train (mined negatives), CUDA bf16, then NFCorpus test"
timeout 240 python3 -m retromae finetune finetune/nfcorpus_small.yaml model.name_or_path=.gpu/minilm \
  data.train=.gpu/nfcorpus_mined.jsonl data.corpus=.gpu/nfcorpus dev.dataset=null train.output_dir=/tmp/gpu_ft \
  train.logging_steps=10 2>&1 | tr '\r' '\n' | grep -a "^step\|rror" | tee "$OUT/finetune_run.txt"
timeout 120 python3 scripts/gpu_checks.py ndcg /tmp/gpu_ft/model .gpu/nfcorpus 2>&1 | grep -v "Loading weights" | tee "$OUT/finetune_ndcg.txt"
fi
if want prep32; then
log "RetroMAE batch-preparation share at batch 32"
timeout 90 python3 scripts/bench_pretrain.py --device cuda --precision bf16 --rounds 2 --steps 5 --batch 32 --model .gpu/minilm 2>&1 | grep -v "Loading weights\|warn" | tee "$OUT/bench_pretrain_b32.txt"
fi

if want deterministic; then
log "resume on CUDA with train.deterministic=true: interrupted at step 3, resumed, the same weights"
for run in straight stopped resumed; do
  extra=""; [ $run = stopped ] && extra="train.stop_at_step=3"; [ $run = resumed ] && extra="train.resume=latest"
  dir=/tmp/gpu_det_$run; [ $run = resumed ] && dir=/tmp/gpu_det_stopped
  timeout 60 python3 -m retromae pretrain pretrain/demo.yaml model.name_or_path=.gpu/minilm "data.corpus=[.gpu/nfcorpus/corpus.jsonl]" \
    train.output_dir=$dir train.max_steps=6 train.save_steps=3 train.deterministic=true model.dropout=0.1 $extra > /dev/null 2>&1
done
python3 -c "
import safetensors.torch as s, torch
a = s.load_file('/tmp/gpu_det_straight/model/model.safetensors'); b = s.load_file('/tmp/gpu_det_stopped/model/model.safetensors')
print('deterministic resume on CUDA: identical weights:', all(torch.equal(a[k], b[k]) for k in a), 'max diff', max((a[k] - b[k]).abs().max().item() for k in a))" | tee "$OUT/deterministic_resume.txt"
fi

if want memory; then
log "BERT-base shape (random init), 32 x 512, bf16: peak memory and samples/s of every objective"
timeout 200 python3 scripts/bench_memory.py --batch 32 --length 512 --steps 4 --tokenizer .gpu/minilm 2>&1 | grep -v "Loading weights\|warn" | tee "$OUT/bench_memory_gpu.txt"
fi

if want search; then
log "the torch search backend: NFCorpus GPU fp16 vs CPU fp32, queries/s at 1M x 768"
timeout 150 python3 scripts/gpu_checks.py search .gpu/minilm .gpu/nfcorpus 2>&1 | grep -v "Loading weights" | tee "$OUT/search.txt"
fi

if want encode-cache; then
log "encoding with a warm tokenized-corpus cache vs sentence-transformers, default precisions"
timeout 100 python3 scripts/bench_encode.py --device cuda --batch-size 128 --rounds 2 --no-compile --model .gpu/minilm --nfcorpus .gpu/nfcorpus 2>&1 | grep -v "Loading weights" | tee "$OUT/bench_encode_cache.txt"
fi

if want study; then
log "the short GPU study (MiniLM, continued pretraining on the local corpora, fine-tuning on NFCorpus, local collections)"
timeout 300 python3 -m retromae study study/gpu_short.yaml output_dir=/tmp/gpu_study model=.gpu/minilm data_root=.gpu/beir \
  mine=.gpu/beir/nfcorpus 'pretrain_overrides=[model.name_or_path=.gpu/minilm, train.per_device_batch_size=64, "data.corpus=[.gpu/beir/nfcorpus/corpus.jsonl]"]' 2>&1 | tr '\r' '\n' | grep -a "^|\|arm\|rror" | tee "$OUT/study_gpu.txt"
fi
log "done"
