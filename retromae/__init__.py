"""retromae: retrieval-oriented pretraining of text encoders (RetroMAE and its family), fine-tuning, evaluation."""

__version__ = "0.1.0"
