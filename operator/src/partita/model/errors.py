"""Errors of model analysis. Every message says what was wrong, where, and what to do."""

from __future__ import annotations


class ModelError(Exception):
    """Base of every error `partita.model` raises for a model it cannot handle."""


class ModelLoadError(ModelError):
    """The model file cannot be read, has an unsupported opset, or lacks input shapes."""


class ShapeError(ModelError):
    """A tensor's shape could not be resolved by inference, folding or a runtime pass."""


class CutError(ModelError):
    """A requested cut or stage boundary is invalid (unknown tensor, inside a subgraph...)."""


class ShardingError(ModelError):
    """A stage cannot be split horizontally; the message names the node that prevents it."""


class CompressionError(ModelError):
    """Quantization or boundary compression failed or is not applicable."""


class ZooError(ModelError):
    """A named model is unknown or its wheel is not installed."""
