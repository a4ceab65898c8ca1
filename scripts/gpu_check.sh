#!/usr/bin/env bash
# The GPU checks: what the CPU cannot show, in one prepared run that fits a lent GPU's budget (15 minutes in all,
# start-up included, 10 minutes a command). Run on the GPU machine from the repository root, with .gpu/ (built by
# scripts/build_gpu_carry.sh) carried beside the checkout. Results go to $OUT, one file per section.
#
#   bash scripts/gpu_check.sh [SECTION ...]
#
# Default sections, first what only a GPU shows; their time limits add up to 7 minutes (420 s) and the set-up takes
# seconds, so the run ends within 8 minutes whatever happens:
#   search-exact   (45 s)  the torch search backend's fp16 pass made fp32-exact, on dot-product vectors of realistic
#                          norm (scores ~150-250), 1M x 768 on the GPU, against an fp32 brute force; queries/s
#   bert-base      (110 s) BERT-base shape (random weights), 32 x 512, bf16: RetroMAE's batch-preparation share of
#                          the step (target <= 5%) and RetroMAE, DupMAE, our MLM next to Hugging Face MLM (target
#                          >= 1.2x)
#   memory         (190 s) peak GPU memory and samples/s of every objective, BERT-base shape, 32 x 512, bf16
#   modernbert     (75 s)  ModernBERT-base shape through RetroMAE, 32 x 512, where this checkout supports the
#                          architecture (else skipped, in seconds)
# Other sections, by name: foundation, objectives, finetune, encode-cache, deterministic, study, search (the older
# checks on all-MiniLM-L6-v2 and NFCorpus; they need the wheels and data of .gpu/).
# Ends with a table of every section (status, seconds, its limit, its key line) and exits 1 if any section failed or
# ran out of time.
set -u
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH=$PWD
source scripts/gpu_sections.sh
TOKENIZER=.gpu/tokenizer  # a BERT vocabulary (all-MiniLM-L6-v2's = bert-base-uncased's): no weights needed

echo "=== environment ($(date +%T))"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"

wheels_installed=0
need_wheels() {  # datasets, pytrec_eval ... for the sections that evaluate or read corpora (not in the image)
  [ $wheels_installed = 1 ] && return 0
  local arrow wheels
  arrow=$(python3 -c "import pyarrow; print(pyarrow.__version__.split('.')[0])" 2>/dev/null || echo 0)
  wheels=".gpu/whl_old/*.whl .gpu/whl/pytrec*.whl"
  [ "$arrow" -ge 24 ] && wheels=".gpu/whl/*.whl"
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $wheels || return 1
  export PYTHONPATH=/tmp/site:$PWD
  [ -f .gpu/nfcorpus/corpus.jsonl ] || gunzip -kf .gpu/nfcorpus/corpus.jsonl.gz
  wheels_installed=1
}

sections=${*:-search-exact bert-base memory modernbert}
want() { [[ " $sections " == *" $1 "* ]]; }

if want search-exact; then
  section search-exact 45 "fp32-exact|queries/s" \
    python3 scripts/gpu_checks.py search-exact --passages 1000000 --queries 2000
fi

if want bert-base; then
  section bert-base 110 "preparation share|ours-retromae|ours-dupmae|hf-mlm|ratio=" \
    bash -c "python3 scripts/gpu_checks.py bert-base-folder $TOKENIZER /tmp/bert_base && \
      python3 scripts/bench_pretrain.py --device cuda --precision bf16 --rounds 2 --steps 3 --batch 32 --length 512 \
      --model /tmp/bert_base --objectives retromae,dupmae,mlm --markdown $OUT/bert_base_throughput.md"
fi

if want memory; then
  # bench_memory goes on past an objective that fails (and says so): the section fails with it
  section memory 190 "ratio=" bash -c "set -o pipefail; python3 scripts/bench_memory.py --batch 32 --length 512 \
    --steps 2 --tokenizer $TOKENIZER | tee /tmp/gpu_memory.txt && ! grep -q ': failed$' /tmp/gpu_memory.txt"
fi

if want modernbert; then
  if python3 scripts/gpu_checks.py modernbert-supported > "$OUT/modernbert_probe.txt" 2>&1; then
    section modernbert 75 "ModernBERT" python3 scripts/gpu_checks.py modernbert
  else
    skip modernbert "$(tail -1 "$OUT/modernbert_probe.txt")"
  fi
fi

# ----- the older checks (by name) ---------------------------------------------------------------------------------

if want foundation; then
  need_wheels
  section masks 120 "masks:" python3 scripts/gpu_checks.py masks .gpu/minilm .gpu/nfcorpus/corpus.jsonl
  section pretrain-b16 120 "ratio=" python3 scripts/bench_pretrain.py --device cuda --precision bf16 --rounds 3 \
    --steps 10 --model .gpu/minilm
  section encode 120 "ours|sentence" python3 scripts/bench_encode.py --device cuda --batch-size 128 --rounds 3 \
    --no-compile --model .gpu/minilm --nfcorpus .gpu/nfcorpus
  section ndcg 120 "ndcg:" python3 scripts/gpu_checks.py ndcg .gpu/minilm .gpu/nfcorpus
  section pretrain-run 120 "^step" bash -c "python3 -m retromae pretrain pretrain/demo.yaml \
    model.name_or_path=.gpu/minilm 'data.corpus=[.gpu/nfcorpus/corpus.jsonl]' train.output_dir=/tmp/gpu_run \
    train.overwrite=true train.max_steps=40 train.per_device_batch_size=64 train.logging_steps=10 train.save_steps=20 \
    | tr '\r' '\n'"
fi

if want objectives; then
  section objectives 240 "ratio=" python3 scripts/bench_pretrain.py --device cuda --precision bf16 --rounds 3 \
    --steps 5 --objectives all --model .gpu/minilm --markdown "$OUT/bench_objectives.md"
fi

if want finetune; then
  need_wheels
  section finetune 240 "^step" bash -c "python3 -m retromae finetune finetune/nfcorpus_small.yaml \
    model.name_or_path=.gpu/minilm data.train=.gpu/nfcorpus_mined.jsonl data.corpus=.gpu/nfcorpus dev.dataset=null \
    train.output_dir=/tmp/gpu_ft train.overwrite=true train.logging_steps=10 | tr '\r' '\n'"
  section finetune-ndcg 120 "ndcg:" python3 scripts/gpu_checks.py ndcg /tmp/gpu_ft/model .gpu/nfcorpus
fi

if want encode-cache; then
  need_wheels
  section encode-cache 100 "cache|ours" python3 scripts/bench_encode.py --device cuda --batch-size 128 --rounds 2 \
    --no-compile --model .gpu/minilm --nfcorpus .gpu/nfcorpus
fi

if want deterministic; then
  section deterministic 200 "identical weights" bash -c '
    for run in straight stopped resumed; do
      extra=""; [ $run = stopped ] && extra="train.stop_at_step=3"; [ $run = resumed ] && extra="train.resume=latest"
      dir=/tmp/gpu_det_$run; [ $run = resumed ] && dir=/tmp/gpu_det_stopped
      python3 -m retromae pretrain pretrain/demo.yaml model.name_or_path=.gpu/minilm \
        "data.corpus=[.gpu/nfcorpus/corpus.jsonl]" train.output_dir=$dir train.max_steps=6 train.save_steps=3 \
        train.deterministic=true model.dropout=0.1 $extra > /dev/null || exit 1
    done
    python3 -c "
import safetensors.torch as s, torch
a = s.load_file(\"/tmp/gpu_det_straight/model/model.safetensors\"); b = s.load_file(\"/tmp/gpu_det_stopped/model/model.safetensors\")
same = all(torch.equal(a[k], b[k]) for k in a)
print(\"deterministic resume on CUDA: identical weights:\", same)
raise SystemExit(0 if same else 1)"'
fi

if want search; then
  need_wheels
  section search 150 "search:" python3 scripts/gpu_checks.py search .gpu/minilm .gpu/nfcorpus
fi

if want study; then
  need_wheels
  section study 300 "^\|" bash -c "python3 -m retromae study study/gpu_short.yaml output_dir=/tmp/gpu_study \
    model=.gpu/minilm data_root=.gpu/beir mine=.gpu/beir/nfcorpus 'pretrain_overrides=[model.name_or_path=.gpu/minilm, \
    train.per_device_batch_size=64, \"data.corpus=[.gpu/beir/nfcorpus/corpus.jsonl]\"]' | tr '\r' '\n'"
fi

summary | tee "$OUT/summary.md"
exit "${PIPESTATUS[0]}"
