"""Contrastive fine-tuning of bi-encoders: data, the bi-encoder objective, hard-negative mining, the runner."""
