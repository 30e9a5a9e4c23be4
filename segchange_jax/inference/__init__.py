"""Inference-side exports and runtimes: ONNX export and the ONNX Runtime backend."""
