"""Export of trained models to ONNX and TensorRT, and the runtime that loads them (not built yet)."""
