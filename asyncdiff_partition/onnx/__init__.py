"""The ONNX backend: an .onnx denoiser through the same op graph, plan, schedule and runtime."""
