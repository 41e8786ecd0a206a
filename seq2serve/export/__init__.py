"""ONNX export of a checkpoint into a model bundle (needs PyTorch; serving does not)."""
