"""The PyTorch model behind the engine's ``Backend`` interface (``--runtime torch``).

A reference backend: the same scheduler, batching and sampling as with onnxruntime, with the
model's own cached decoding underneath. Serving with it needs PyTorch; the default onnx
runtime does not.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from seq2serve.engine.runtime import DecoderResult, EncoderResult
from seq2serve.model.cache import KV, KVCache
from seq2serve.model.checkpoint import load_model
from seq2serve.model.transformer import Transformer


class TorchBackend:
    def __init__(self, model: Transformer, device: str = "cpu") -> None:
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for but PyTorch sees no CUDA device")
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.config = model.cfg

    @classmethod
    def from_bundle(cls, path: str | Path, device: str = "cpu") -> TorchBackend:
        """A checkpoint or bundle directory (config.json, tokenizer.json, model.safetensors)."""
        model, _ = load_model(Path(path))
        return cls(model, device)

    def release_memory(self) -> None:
        pass  # the weights are PyTorch's tensors, all in use

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    @staticmethod
    def _numpy(tensor: torch.Tensor) -> np.ndarray:
        return tensor.detach().to("cpu").contiguous().numpy()

    @torch.inference_mode()
    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> EncoderResult:
        m = self.model
        ids, mask = self._tensor(input_ids), self._tensor(attention_mask)
        hidden = m.encode(ids, mask)
        pooled = m.pool(hidden, mask)
        logits = m.classifier(pooled) if m.classifier is not None else pooled[:, :0]
        cross = [self._numpy(t) for kv in m.cross_kv(hidden) for t in (kv.key, kv.value)]
        return EncoderResult(self._numpy(hidden), self._numpy(pooled), self._numpy(logits), cross)

    @torch.inference_mode()
    def decode(
        self,
        input_ids: np.ndarray,
        position_ids: np.ndarray,
        decoder_attention_mask: np.ndarray,
        encoder_attention_mask: np.ndarray,
        past: list[np.ndarray],
        cross: list[np.ndarray],
        exact_logits: bool = False,  # every logit here is exact
    ) -> DecoderResult:
        n = self.config.n_decoder_layers
        cache = KVCache(
            [KV(self._tensor(past[2 * i]), self._tensor(past[2 * i + 1])) for i in range(n)]
        )
        cross_kv = [
            KV(self._tensor(cross[2 * i]), self._tensor(cross[2 * i + 1])) for i in range(n)
        ]
        logits = self.model.decode(
            self._tensor(input_ids),
            self._tensor(position_ids),
            self._tensor(decoder_attention_mask),
            cache,
            cross_kv,
            self._tensor(encoder_attention_mask),
        )
        present = [self._numpy(t) for kv in cache.layers for t in (kv.key, kv.value)]
        return DecoderResult(self._numpy(logits), present)
