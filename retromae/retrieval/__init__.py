"""Retrieval evaluation: encode, index with FAISS, search, score with trec_eval semantics."""
