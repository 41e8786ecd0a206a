"""seq2serve: serve Transformer encoder-decoder models."""

__version__ = "0.1.0"
