"""Model analysis: load, profile, cut, slice and shard ONNX graphs (onnx only, no runtime)."""
