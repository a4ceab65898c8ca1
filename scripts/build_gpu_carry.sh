#!/usr/bin/env bash
# Builds .gpu/, what a GPU check carries beside the checkout (an ignored folder; the carried tree is capped at
# 64 MiB), and lists it in .gpu/MANIFEST.txt. Run from the repository root on the development machine:
#
#   bash scripts/build_gpu_carry.sh [PYTHON]        # PYTHON: the interpreter with this project installed
#
# The GPU image (torch 2.11 / CUDA 13, transformers, accelerate; no faiss, no datasets, no pytrec_eval) cannot
# download anything, so:
#   .gpu/tokenizer   all-MiniLM-L6-v2's tokenizer (bert-base-uncased's vocabulary): the default sections build
#                    BERT-base-shaped models with random weights from it; nothing else is needed for them
#   .gpu/minilm      all-MiniLM-L6-v2 with its weights stored in fp16 (44 MB instead of 87; every loader reads them
#                    back into fp32), for the older sections (foundation, finetune, encode-cache, search, study)
#   .gpu/nfcorpus    NFCorpus's corpus (gzipped), queries and test qrels, from ../shared/data/beir (if present)
#   .gpu/whl         datasets 5.2, dill, multiprocess, pytrec_eval-terrier wheels for Python 3.12 (pyarrow >= 24)
#   .gpu/whl_old     datasets 4.0 with its dill and multiprocess, for an image whose pyarrow is older
set -euo pipefail
PYTHON=${1:-python3}
CARRY=.gpu
LIMIT=$((64 * 1024 * 1024))
mkdir -p $CARRY/whl $CARRY/whl_old

echo "tokenizer and fp16 model"
"$PYTHON" - <<'EOF'
import torch
from transformers import AutoModel, AutoTokenizer

from retromae.demo import minilm_path

source = minilm_path()
tokenizer = AutoTokenizer.from_pretrained(source)
tokenizer.save_pretrained(".gpu/tokenizer")
model = AutoModel.from_pretrained(source, dtype=torch.float16)
model.save_pretrained(".gpu/minilm", safe_serialization=True)
tokenizer.save_pretrained(".gpu/minilm")
import pathlib, shutil
for extra in ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json", "1_Pooling", "2_Normalize"):
    path = pathlib.Path(source) / extra
    if path.is_dir():
        shutil.copytree(path, f".gpu/minilm/{extra}", dirs_exist_ok=True)
    elif path.is_file():
        shutil.copy(path, f".gpu/minilm/{extra}")
EOF

if [ -d ../shared/data/beir/nfcorpus ]; then
  echo "NFCorpus"
  mkdir -p $CARRY/nfcorpus/qrels
  gzip -c ../shared/data/beir/nfcorpus/corpus.jsonl > $CARRY/nfcorpus/corpus.jsonl.gz
  cp ../shared/data/beir/nfcorpus/queries.jsonl $CARRY/nfcorpus/
  cp ../shared/data/beir/nfcorpus/qrels/test.tsv $CARRY/nfcorpus/qrels/
else
  echo "no ../shared/data/beir/nfcorpus: the sections that evaluate on NFCorpus will fail"
fi

echo "wheels (Python 3.12, manylinux x86_64)"
download() {
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 "$@"
}
download -d $CARRY/whl datasets==5.2.0 dill multiprocess pytrec_eval-terrier
download -d $CARRY/whl_old datasets==4.0.0 dill==0.3.8 multiprocess==0.70.16

(cd $CARRY && find . -type f ! -name MANIFEST.txt -printf "%s\t%p\n" | sort -k2) > $CARRY/MANIFEST.txt
total=$(awk -F'\t' '{s += $1} END {print s}' $CARRY/MANIFEST.txt)
echo "total $total bytes" >> $CARRY/MANIFEST.txt
cat $CARRY/MANIFEST.txt
if [ "$total" -gt "$LIMIT" ]; then
  echo "$CARRY is $total bytes: over the 64 MiB a GPU check can carry" >&2
  exit 1
fi
echo "$CARRY: $((total / 1024 / 1024)) MiB of 64"
