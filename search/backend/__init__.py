"""Layer 5, backend: TVM compile (tuning, int8 lowering), the one compile-and-time path, ONNX
Runtime for reference figures, the per-layer latency table, and where a figure came from."""
