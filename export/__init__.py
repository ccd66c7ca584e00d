"""Export of trained models to ONNX and TensorRT, and the runtime that loads the artifacts."""
