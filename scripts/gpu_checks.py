"""CUDA checks the CPU cannot make, run by scripts/gpu_check.sh on a GPU machine.

search-exact: the torch search backend (an fp16 first pass, candidates re-scored in fp32) on vectors of a
        dot-product model (anisotropic, norm ~14, scores ~150-250), against an fp32 brute force on the same device:
        the same top-k and scores (exits 1 if not), queries/s, and how many top-10 lists fp16 scores alone would
        have reordered. Runs on the CPU too (--device cpu --dtype float16: the same code path, small sizes).
bert-base-folder TOKENIZER OUT: a BERT-base-shaped masked LM with random weights and TOKENIZER's vocabulary, saved
        to OUT (bench_pretrain.py takes a model folder; nothing is carried but the tokenizer).
modernbert-supported / modernbert: whether this checkout pretrains ModernBERT with RetroMAE, and a step of it.
masks:  RetroMAE's prepared batch (encoder mask, replacements, the B x L x L decoder mask) is identical on the CPU
        and on CUDA: the counter-based RNG's int32 arithmetic wraps the same way on both.
ndcg:   NFCorpus test nDCG@10 of all-MiniLM-L6-v2 with our encoder at fp32 and at bf16 autocast (exact search by a
        matrix product on the GPU, scored with retromae.retrieval.metrics; faiss is not in the GPU image).
search: the torch search backend on the GPU (fp16) against exact fp32 search on the CPU, on NFCorpus (same top-100
        ids, same nDCG@10), its queries/s on 1M synthetic passages x 768 dims, and faiss on GPUs where the image has
        a faiss with GPU support.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def check_masks(model_dir: str, corpus: Path, device: str = "cuda") -> None:
    from retromae.modeling import ModelConfig, load_masked_lm, load_tokenizer
    from retromae.objectives import build_objective_config, objective_class
    from retromae.rng import example_seeds

    cfg = ModelConfig(name_or_path=model_dir)
    tokenizer = load_tokenizer(cfg)
    objective = objective_class("retromae")(load_masked_lm(cfg), tokenizer, build_objective_config({"name": "retromae"}))
    texts = [json.loads(line)["text"] for _, line in zip(range(64), corpus.open())]
    enc = tokenizer(texts, truncation=True, max_length=256, padding=True, return_tensors="pt")
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
             "seeds": example_seeds(42, 3, torch.arange(1000, 1064))}
    on_cpu = objective.prepare(batch)
    objective.to(device)
    on_gpu = objective.prepare({k: v.to(device) for k, v in batch.items()})
    same = {k: torch.equal(on_cpu[k], on_gpu[k].cpu()) for k in on_cpu}
    print(f"masks: CPU == CUDA for every prepared tensor: {all(same.values())} {same}")
    visible = objective.visibility(on_gpu)  # enhanced decoding's (B, L, L) mask, made from the prepared batch
    print(f"masks: decoder mask {tuple(visible.shape)}, visible share "
          f"{visible.float().mean().item():.3f}, encoder mask share "
          f"{(on_gpu['encoder_mask'].sum() / (on_gpu['words'] >= 0).sum()).item():.3f}")


def _autocast(forward, features):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        return forward(features)


def check_ndcg(model_dir: str, nfcorpus: Path, precisions=("no", "bf16", "bf16-autocast")) -> None:
    from retromae.retrieval.data import load_beir_folder
    from retromae.retrieval.encoder import EncodeConfig, TextEncoder
    from retromae.retrieval.metrics import evaluate

    data = load_beir_folder(nfcorpus, "test")
    ids, texts = data.passages(" ")
    qids = list(data.queries)
    for precision in precisions:
        weights = "no" if precision == "bf16-autocast" else precision
        enc = TextEncoder(model_dir, EncodeConfig(query_max_len=256, passage_max_len=256, precision=weights,
                                                  batch_size=128), device="cuda")
        if precision.endswith("autocast"):  # for comparison: fp32 weights under bf16 autocast
            forward = enc._forward
            enc._forward = lambda f, forward=forward: _autocast(forward, f)
            enc.precision = precision
        torch.cuda.synchronize()
        start = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start[0].record()
        docs = torch.from_numpy(enc.encode(texts, "passage", show_progress=False)).cuda()
        start[1].record()
        torch.cuda.synchronize()
        seconds = start[0].elapsed_time(start[1]) / 1000
        queries = torch.from_numpy(enc.encode([data.queries[q] for q in qids], "query", show_progress=False)).cuda()
        scores, top = (queries @ docs.T).topk(100, dim=1)
        run = {q: {ids[j]: float(s) for j, s in zip(row.tolist(), sc.tolist())} for q, row, sc in zip(qids, top, scores)}
        means, _ = evaluate(data.qrels, run, ["ndcg@10", "recall@100"])
        print(f"ndcg: NFCorpus test, precision {enc.precision}: nDCG@10 {means['ndcg@10']:.4f}, "
              f"Recall@100 {means['recall@100']:.4f}; corpus of {len(texts)} passages encoded in {seconds:.2f} s "
              f"({len(texts) / seconds:.0f} passages/s)")


def check_search(model_dir: str, nfcorpus: Path, device: str = "cuda") -> None:
    import time

    import numpy as np

    from retromae.retrieval.data import load_beir_folder
    from retromae.retrieval.encoder import EncodeConfig, TextEncoder
    from retromae.retrieval.metrics import evaluate
    from retromae.retrieval.search import TorchExact, faiss_has_gpus, search_shard, torch_devices

    data = load_beir_folder(nfcorpus, "test")
    ids, texts = data.passages(" ")
    qids = list(data.queries)
    enc = TextEncoder(model_dir, EncodeConfig(precision="no", batch_size=128), device=device)
    docs = enc.encode(texts, "passage", show_progress=False)
    queries = enc.encode([data.queries[q] for q in qids], "query", show_progress=False)
    runs = {}
    for name, devices in (("gpu-fp16", torch_devices(device)), ("cpu-fp32", [torch.device("cpu")])):
        scores, positions = TorchExact(docs, devices).search(queries, 100)
        runs[name] = positions
        run = {q: {ids[p]: float(x) for p, x in zip(row, sc)} for q, row, sc in zip(qids, positions, scores)}
        print(f"search: NFCorpus with the torch backend, {name} on {devices}: nDCG@10 "
              f"{evaluate(data.qrels, run, ['ndcg@10'])[0]['ndcg@10']:.4f}")
    overlap = np.mean([len(set(a) & set(b)) / 100 for a, b in zip(runs["gpu-fp16"], runs["cpu-fp32"])])
    top10 = np.mean([list(a[:10]) == list(b[:10]) for a, b in zip(runs["gpu-fp16"], runs["cpu-fp32"])])
    print(f"search: top-100 overlap GPU fp16 / CPU fp32 {overlap:.4f}; identical top-10 lists {top10:.3f}")
    rng = np.random.default_rng(0)
    corpus = rng.standard_normal((1_000_000, 768), dtype=np.float32)
    probe = rng.standard_normal((10_000, 768), dtype=np.float32)
    index = TorchExact(corpus, torch_devices(device))
    index.search(probe[:256], 1000)  # warm-up
    torch.cuda.synchronize()
    started = time.perf_counter()
    index.search(probe, 1000)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    print(f"search: torch backend, 1M x 768 fp16 on {len(torch_devices(device))} GPU(s), top-1000: "
          f"{len(probe) / seconds:.0f} queries/s")
    if faiss_has_gpus():
        started = time.perf_counter()
        search_shard(probe, corpus, 1000, backend="faiss", use_gpu=True)
        print(f"search: faiss GPU Flat (sharded, fp16), the same: {len(probe) / (time.perf_counter() - started):.0f} "
              "queries/s (including the index build)")
    else:
        print("search: no faiss with GPU support in this image (the torch backend is what `auto` picks)")


def dot_product_vectors(n: int, seed: int, d: int = 768):
    """CLS vectors of a dot-product model: a direction shared by all (norm ~14) plus a spread, so that scores are
    ~170-230, as RetroMAE's (tau = 1) are."""
    import numpy as np

    rng = np.random.default_rng(seed)
    direction = np.random.default_rng(99).standard_normal(d)
    direction /= np.linalg.norm(direction)
    spread = np.random.default_rng(98).uniform(0.3, 1.7, d)
    out = np.empty((n, d), np.float32)
    for start in range(0, n, 100_000):
        rows = min(100_000, n - start)
        out[start : start + rows] = 14 * direction + 0.25 * rng.standard_normal((rows, d)) * spread
    return out


def check_search_exact(passages: int, queries: int, device: str, dtype: str, k: int = 100) -> bool:
    import time

    import numpy as np

    from retromae.retrieval.search import TorchExact, torch_devices

    dev = torch.device(device)
    docs, probe = dot_product_vectors(passages, 0), dot_product_vectors(queries, 1)
    half = {"float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    index = TorchExact(docs, torch_devices(device) if dev.type == "cuda" else [dev], dtype=half,
                       chunk_rows=max(1, passages // 4) if dev.type == "cpu" else 1 << 20)
    index.search(probe[:64], k)  # warm-up
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    started = time.perf_counter()
    scores, positions = index.search(probe, k)
    sync()
    seconds = time.perf_counter() - started
    # the fp32 brute force (TF32 off: full fp32 products), and fp16 scores alone (what the backend returned before)
    torch.backends.cuda.matmul.allow_tf32 = False
    docs32 = torch.from_numpy(docs).to(dev)
    q32 = torch.from_numpy(probe).to(dev)
    brute_scores, brute_positions, rounded = [], [], []
    for start in range(0, queries, 256):
        block = q32[start : start + 256]
        top = (block @ docs32.T).topk(k, dim=1)
        brute_scores.append(top.values.cpu().numpy())
        brute_positions.append(top.indices.cpu().numpy())
        rounded.append((block.to(half) @ docs32.to(half).T).float().topk(10, dim=1).indices.cpu().numpy())
    brute_scores, brute_positions = np.concatenate(brute_scores), np.concatenate(brute_positions)
    rounded = np.concatenate(rounded)
    tolerance = 1e-5 * float(np.abs(brute_scores).max())
    score_error = float(np.abs(scores - brute_scores).max())
    gaps = np.abs(np.diff(brute_scores, axis=1))
    separated = np.ones_like(brute_scores, dtype=bool)
    separated[:, 1:] &= gaps > tolerance
    separated[:, :-1] &= gaps > tolerance
    separated[:, -1] = False
    same = bool(np.array_equal(positions[separated], brute_positions[separated]))
    reordered = float(np.mean([(a != b).any() for a, b in zip(rounded, brute_positions[:, :10])]))
    print(f"search-exact: {passages:,} x {docs.shape[1]} dot-product vectors (scores {brute_scores.min():.0f}-"
          f"{brute_scores.max():.0f}), {queries:,} queries, top-{k}, first pass {dtype} on {device}")
    print(f"search-exact: fp16 scores alone would reorder {100 * reordered:.1f}% of the top-10 lists")
    print(f"search-exact: largest score difference to fp32 {score_error:.2e} (tolerance {tolerance:.1e}); "
          f"{100 * separated.mean():.1f}% of ranks compared, identical: {same}; "
          f"{index.fallbacks} (query, chunk) pairs searched again in fp32")
    print(f"search-exact: {queries / seconds:,.0f} queries/s")
    exact = same and score_error <= tolerance
    print(f"fp32-exact: {'yes' if exact else 'NO'}")
    return exact


def make_bert_base(tokenizer_dir: str, out: str) -> None:
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = BertForMaskedLM(BertConfig(vocab_size=len(tokenizer)))  # bert-base-uncased's shape: 12 x 768, 512
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"BERT-base shape, random weights, {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters: {out}")


def modernbert_objective():
    """RetroMAE on a small ModernBERT, if this checkout's model loading takes the architecture (it raises if not)."""
    from transformers import AutoTokenizer, ModernBertConfig, ModernBertForMaskedLM

    from retromae.objectives import build_objective_config, objective_class

    config = ModernBertConfig(vocab_size=50368, hidden_size=768, num_hidden_layers=22, intermediate_size=1152,
                              num_attention_heads=12)
    tokenizer = AutoTokenizer.from_pretrained(".gpu/tokenizer")
    return objective_class("retromae")(ModernBertForMaskedLM(config), tokenizer,
                                       build_objective_config({"name": "retromae"}))


def check_modernbert_supported() -> bool:
    try:
        modernbert_objective()
    except Exception as err:  # noqa: BLE001 (any refusal means: not supported by this checkout)
        print(f"ModernBERT is not supported by this checkout ({type(err).__name__}: {str(err)[:120]})")
        return False
    print("ModernBERT: supported")
    return True


def check_modernbert() -> None:
    import time

    objective = modernbert_objective().cuda()
    batch = {"input_ids": torch.randint(1000, 30000, (32, 512), device="cuda"),
             "attention_mask": torch.ones(32, 512, dtype=torch.long, device="cuda"),
             "seeds": torch.arange(32, device="cuda")}
    optimizer = torch.optim.AdamW(objective.parameters(), lr=1e-5)
    for step in range(3):
        if step == 1:
            torch.cuda.synchronize()
            started = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            losses = objective(objective.prepare(batch))
        sum(losses.values()).backward()
        optimizer.step()
        optimizer.zero_grad()
    torch.cuda.synchronize()
    print(f"ModernBERT-base shape, RetroMAE, 32 x 512 bf16: {64 / (time.perf_counter() - started):.1f} samples/s, "
          f"peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


def main() -> int:
    import argparse

    parser = argparse.ArgumentParser(description="CUDA checks (see the module docstring)")
    sub = parser.add_subparsers(dest="what", required=True)
    exact = sub.add_parser("search-exact")
    exact.add_argument("--passages", type=int, default=1_000_000)
    exact.add_argument("--queries", type=int, default=2000)
    exact.add_argument("--device", default="cuda")
    exact.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    exact.add_argument("--k", type=int, default=100)
    folder = sub.add_parser("bert-base-folder")
    folder.add_argument("tokenizer")
    folder.add_argument("out")
    sub.add_parser("modernbert-supported")
    sub.add_parser("modernbert")
    for name in ("masks", "ndcg", "ndcg-fp32", "search"):
        older = sub.add_parser(name)
        older.add_argument("model")
        older.add_argument("data", type=Path)
        older.add_argument("device", nargs="?", default="cuda")
    args = parser.parse_args()
    if args.what == "search-exact":
        return 0 if check_search_exact(args.passages, args.queries, args.device, args.dtype, args.k) else 1
    if args.what == "bert-base-folder":
        make_bert_base(args.tokenizer, args.out)
    elif args.what == "modernbert-supported":
        return 0 if check_modernbert_supported() else 1
    elif args.what == "modernbert":
        check_modernbert()
    elif args.what == "masks":
        check_masks(args.model, args.data, args.device)
    elif args.what in ("ndcg", "ndcg-fp32"):
        check_ndcg(args.model, args.data, ("no",) if args.what == "ndcg-fp32" else ("no", "bf16", "bf16-autocast"))
    else:
        check_search(args.model, args.data, args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
