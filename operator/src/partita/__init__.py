"""Partita: place partitioned ONNX models on edge and cloud Kubernetes nodes."""

__version__ = "0.1.0"
