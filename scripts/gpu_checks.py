"""CUDA checks the CPU cannot make, run by scripts/gpu_check.sh on a GPU machine.

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
    print(f"masks: decoder mask {tuple(on_gpu['decoder_visible'].shape)}, visible share "
          f"{on_gpu['decoder_visible'].float().mean().item():.3f}, encoder mask share "
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


if __name__ == "__main__":
    what, model, data = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    device = sys.argv[4] if len(sys.argv) > 4 else "cuda"
    {"masks": lambda: check_masks(model, data, device), "ndcg": lambda: check_ndcg(model, data),
     "ndcg-fp32": lambda: check_ndcg(model, data, ("no",)), "search": lambda: check_search(model, data, device)}[what]()
