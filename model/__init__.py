"""Training, evaluation and ONNX export of the variational auto-encoder (needs torch)."""
