"""Corpus reading, cutting into examples, and batching."""
