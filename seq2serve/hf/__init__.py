"""Import Hugging Face MarianMT and BART checkpoints (``seq2serve import-hf``).

Needs the optional ``hf`` extra (``transformers``, ``sentencepiece``) at import time only:
the checkpoint it writes is an ordinary seq2serve checkpoint, exported and served without them.
"""
