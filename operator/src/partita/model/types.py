"""What the planner knows about a model: the frozen result of profiling it.

This is the contract between `partita.model` (which fills it) and `partita.planner`
(which reads it). Fields may be added; none may be renamed or removed without
changing both sides.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class OpClass(StrEnum):
    """Operator families whose speed is measured separately per device."""

    CONV = "conv"
    MATMUL = "matmul"
    ELEMENTWISE = "elementwise"
    POOL = "pool"
    NORM = "norm"
    MOVEMENT = "movement"  # reshape, transpose, concat, gather, slice...
    OTHER = "other"


@dataclass(frozen=True)
class TensorInfo:
    """A tensor with a fully resolved shape."""

    name: str
    dtype: str  # numpy dtype name, e.g. "float32"
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True)
class NodeCost:
    """One graph node in topological order, with its cost."""

    index: int
    name: str
    op_type: str
    op_class: OpClass
    flops: int
    param_bytes: int
    output_bytes: int
    # Activation bytes alive right after this node ran (graph inputs included),
    # so the peak activation memory of a range of nodes is the max over it.
    live_bytes: int
    # True when the node can be split by output columns/channels across devices.
    shardable: bool = False
    # Multiply-accumulates of Conv/ConvTranspose/MatMul/Gemm (flops ~ 2 * macs there).
    macs: int = 0


@dataclass(frozen=True)
class CutPoint:
    """A topological boundary: nodes[:position] run before it, nodes[position:] after.

    `tensors` are all the tensors produced before the boundary (or graph inputs)
    and consumed after it, i.e. what must cross the network if the model is cut here.
    """

    position: int
    tensors: tuple[TensorInfo, ...]
    nbytes: int
    flops_before: int
    param_bytes_before: int


@dataclass(frozen=True)
class ModelProfile:
    """Everything the planner needs about one model with concrete input shapes."""

    digest: str  # sha256 of the model bytes
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    nodes: tuple[NodeCost, ...]
    # The useful frontier of cut points in increasing position, excluding the
    # trivial ones (position 0 = the inputs, position len(nodes) = the outputs).
    cut_points: tuple[CutPoint, ...]
    total_flops: int
    param_bytes: int
    # Why some boundaries are not offered (control flow kept whole, ...).
    notes: tuple[str, ...] = field(default_factory=tuple)
    # How many node-output tensors each loading step resolved the shape of:
    # (("tensors", n), ("inference", a), ("folding", b), ("runtime", c)).
    shape_coverage: tuple[tuple[str, int], ...] = field(default_factory=tuple)

    @property
    def input_bytes(self) -> int:
        return sum(t.nbytes for t in self.inputs)

    @property
    def output_bytes(self) -> int:
        return sum(t.nbytes for t in self.outputs)


class GatherMode(StrEnum):
    """How the partial outputs of a stage's shards rebuild one stage output."""

    CONCAT = "concat"  # concatenate the shards' parts along `axis`, in shard order
    SUM = "sum"  # add the shards' parts (row-parallel MatMul, split reductions)
    TAKE = "take"  # one shard computes the whole tensor (branch parallelism)


@dataclass(frozen=True)
class GatherSpec:
    """Rebuilds stage output `output` from tensor `part_name(output, i)` of each shard i."""

    output: str
    mode: GatherMode
    axis: int = 0
    shard: int = 0  # for TAKE: the shard that produces it

    @staticmethod
    def part_name(output: str, shard: int) -> str:
        return f"{output}__shard{shard}"


@dataclass(frozen=True)
class ShardLayout:
    """How one stage is split horizontally; each shard is a standalone ONNX model
    that reads (a subset of) the stage inputs and produces the part tensors."""

    proportions: tuple[float, ...]
    gathers: tuple[GatherSpec, ...]
    strategy: str  # "column", "conv-channel", "megatron", "branch", ...
    # Estimated FLOPs each shard runs (replicated prefix included), in shard order.
    shard_flops: tuple[int, ...] = ()

    @property
    def shards(self) -> int:
        return len(self.proportions)
