"""Serving engine: generation loop, batching and streaming text output."""
