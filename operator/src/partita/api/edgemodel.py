"""EdgeModel (namespaced): an ONNX model to serve, where its requests enter, where it may run
and what it must achieve. Field names follow the planner's `ModelRequest`."""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from partita.api.meta import (
    CONDITIONS,
    DNS_LABEL,
    DNS_SUBDOMAIN,
    LABEL_KEY,
    OBJECT,
    Condition,
    DnsName,
    LabelValue,
    ObjectMeta,
    Tier,
    is_label_key,
)
from partita.api.rules import ApiModel, CelRule, StatusModel, parse_manifest, unique

# URI characters (RFC 3986 unreserved, sub-delims, ':', '@', '%'), without the quote that
# would end the CEL string; no spaces, controls, backslashes or fragments.
_PATH = "[-A-Za-z0-9._~%!$&()*+,;=:@/]"
# A host name (any case) or an IPv4 address; IPv6 literals are not taken: name the host.
_HOST_LABEL = "[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?"
_HOST = f"({_HOST_LABEL}([.]{_HOST_LABEL})*|[0-9]{{1,3}}([.][0-9]{{1,3}}){{3}})"
_PORT = "(:(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3}))?"
SOURCE_URI = (
    f"^(file:///{_PATH}+"
    f"|https?://{_HOST}{_PORT}(/{_PATH}*)?([?]{_PATH.replace('/]', '/?]')}*)?"
    f"|configmap://{DNS_LABEL.strip('^$')}/{DNS_SUBDOMAIN}/[-._a-zA-Z0-9]{{1,253}})$"
)
# A `..` segment in a file path, and the keys Kubernetes refuses for a ConfigMap.
DOT_SEGMENT = "^file://.*/[.][.](/.*)?$"
DOT_KEY = "^configmap://.*/[.][.]?$"
SHA256 = r"^[a-f0-9]{64}$"
# Stage objects are named `<model>-r<revision>-s<stage>-<shard>`: keep that under 63.
MAX_NAME_LENGTH = 40

SET: dict[str, Any] = {"x-kubernetes-list-type": "set"}
Dim = Annotated[int, Field(ge=1, le=1 << 20)]


class ModelSourceSpec(ApiModel):
    """Where the ONNX file comes from and the digest it must have."""

    uri: str = Field(max_length=2048)
    """file:///PATH (on the operator's filesystem), http(s)://HOST/PATH, or
    configmap://NAMESPACE/NAME/KEY (binaryData or data key of a ConfigMap in the
    EdgeModel's namespace)."""
    sha256: str = Field(max_length=64)
    """sha256 of the file, 64 lowercase hex characters; a mismatch stops the rollout."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule=f"self.uri.matches('{SOURCE_URI}')",
            message="source.uri must be file:///PATH, http(s)://HOST[:PORT]/PATH (no "
            "credentials, spaces or fragment) or configmap://NAMESPACE/NAME/KEY with "
            "Kubernetes names",
            holds=lambda s: re.search(SOURCE_URI, s.uri) is not None,
            field_path=".uri",
        ),
        CelRule(
            rule=f"!self.uri.matches('{DOT_SEGMENT}') && !self.uri.matches('{DOT_KEY}')",
            message="source.uri must not climb out of its directory ('..') or name the "
            "ConfigMap key '.' or '..'",
            holds=lambda s: (
                re.search(DOT_SEGMENT, s.uri) is None and re.search(DOT_KEY, s.uri) is None
            ),
            field_path=".uri",
        ),
        CelRule(
            rule=f"self.sha256.matches('{SHA256}')",
            message="source.sha256 must be 64 lowercase hex characters (the sha256sum of the file)",
            holds=lambda s: re.search(SHA256, s.sha256) is not None,
            field_path=".sha256",
        ),
    )


class PartitioningMode(StrEnum):
    AUTO = "auto"
    NONE = "none"
    VERTICAL = "vertical"
    HORIZONTAL = "horizontal"


class Compression(StrEnum):
    NONE = "none"
    FP16 = "fp16"
    INT8 = "int8"


class Objective(StrEnum):
    LATENCY = "latency"
    THROUGHPUT = "throughput"
    ENERGY = "energy"


class Partitioning(ApiModel):
    """How the model may be cut: across tiers (stages) and across devices of a tier (shards)."""

    mode: PartitioningMode = PartitioningMode.AUTO
    """auto: cuts and shards as they pay; none: the whole model on one node; vertical:
    cuts only; horizontal: one stage split across devices of one pool."""
    max_stages: int = Field(4, ge=1, le=16)
    """Most consecutive stages the model may be cut into."""
    max_shards: int = Field(4, ge=1, le=16)
    """Most devices one stage may be split across."""
    cut_compression: Compression = Compression.NONE
    """The most aggressive encoding allowed for tensors crossing a cut (fp16, int8 lose
    some accuracy)."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule="self.mode != 'vertical' || self.maxStages >= 2",
            message="partitioning.maxStages must be at least 2 when partitioning.mode is vertical",
            holds=lambda p: p.mode != PartitioningMode.VERTICAL or p.max_stages >= 2,
            field_path=".maxStages",
        ),
        CelRule(
            rule="self.mode != 'horizontal' || self.maxShards >= 2",
            message="partitioning.maxShards must be at least 2 when partitioning.mode is "
            "horizontal",
            holds=lambda p: p.mode != PartitioningMode.HORIZONTAL or p.max_shards >= 2,
            field_path=".maxShards",
        ),
    )


class Slo(ApiModel):
    """Service level the plan must meet; a model that cannot meet it is reported, not hidden."""

    p95_latency_seconds: float | None = Field(None, gt=0, le=3600)
    """95th percentile end-to-end latency, in seconds."""
    min_throughput_rps: float | None = Field(None, gt=0, le=1e6)
    """Requests per second the model must sustain."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule="has(self.p95LatencySeconds) || has(self.minThroughputRps)",
            message="slo needs slo.p95LatencySeconds or slo.minThroughputRps (or drop slo)",
            holds=lambda s: s.p95_latency_seconds is not None or s.min_throughput_rps is not None,
        ),
    )


class Privacy(ApiModel):
    """Raw input never leaves one tier: the first stage runs there."""

    raw_input_tier: Tier
    """The tier raw input must stay in."""


class Cascade(ApiModel):
    """Confidence cascade (joint inference): a small model answers at the edge, and only the
    inputs it is not confident about go on to the main model.

    The small model runs as its own stage in the data source's pool; an input whose
    confidence is at least `threshold` is answered there, any other is forwarded as it came
    (the raw input) to the main model's first stage, which the planner places like any
    stage. Confidence is the maximum softmax probability: the largest value of `output`,
    which must hold class probabilities (a softmax's output). With `privacy`, the main
    model's first stage stays in `privacy.rawInputTier` as it would without a cascade, so
    forwarded inputs never leave that tier either: with an edge tier only features reach
    the cloud."""

    model: ModelSourceSpec
    """The small model: an ONNX file with the main model's inputs and outputs (names and
    types), so an answer from either looks the same to a client."""
    output: str = Field(min_length=1, max_length=256)
    """Output tensor of the small model holding class probabilities; its largest value is
    the confidence."""
    threshold: float = Field(gt=0, le=1)
    """Confidence at or above which the small model's answer is final, in (0, 1]."""
    expected_offload_rate: float = Field(0.5, ge=0, le=1)
    """Share of requests expected to go on to the main model, used until the stage
    servers have measured it (then the measured share replaces it)."""


class Calibration(StrEnum):
    CAFFE = "caffe"
    UNIT = "unit"
    SEEDED = "seeded"


class Quantization(ApiModel):
    """int8 stages and int8 cuts, only within a measured accuracy budget.

    When allowed, the operator quantizes the model with onnxruntime (static, with
    calibration images, when the model takes images and `calibration` is an image mode;
    dynamic otherwise) and measures, on inputs it did not calibrate on, the drop against
    float32: the share of inputs whose top-1 class differs for a classifier (an output of
    shape [N, C], C >= 2, computed by a Softmax), else the mean relative error of the outputs
    (max |int8 - fp32| / max |fp32|). Above maxAccuracyDrop int8 is refused; otherwise the
    planner may run stages in int8 when no float32 plan fits or meets the SLO, with the
    speed and weight bytes measured on the quantized model."""

    allowed: bool = False
    """Whether Partita may run stages in int8 or send int8 tensors across a cut."""
    max_accuracy_drop: float = Field(0.01, ge=0, le=1)
    """Largest measured accuracy drop accepted, in [0, 1] (0.01 = one point)."""
    calibration: Calibration = Calibration.CAFFE
    """Inputs to calibrate and measure on: caffe (real images shipped with scikit-image,
    0-255 BGR less the ImageNet mean, as Caffe-trained classifiers take them), unit (the same
    images as RGB in [0, 1]) or seeded (random values, for models that take no images;
    quantization is then dynamic)."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule="!self.allowed || self.maxAccuracyDrop > 0.0",
            message="quantization.maxAccuracyDrop must be above 0 when quantization.allowed is "
            "true (int8 always costs some accuracy)",
            holds=lambda q: not q.allowed or q.max_accuracy_drop > 0,
            field_path=".maxAccuracyDrop",
        ),
    )


class Rescheduling(ApiModel):
    """When a better plan is worth a move."""

    min_improvement: float = Field(0.4, ge=0, lt=1)
    """Relative predicted gain needed to move, in [0, 1) (0.4 = 40% better). The default is
    the smallest gain that metrics jittering by +-20% cannot fake, so plans do not flap."""
    cooldown_seconds: float = Field(120.0, ge=0, le=86400)
    """Seconds to wait after a move before the next one (node loss moves at once)."""


class TolerationOperator(StrEnum):
    EXISTS = "Exists"
    EQUAL = "Equal"


class TaintEffect(StrEnum):
    NO_SCHEDULE = "NoSchedule"
    PREFER_NO_SCHEDULE = "PreferNoSchedule"
    NO_EXECUTE = "NoExecute"


class Toleration(ApiModel):
    """A node taint the model's stages tolerate (as in a Pod spec)."""

    key: str = Field(min_length=1, max_length=317, pattern=LABEL_KEY)
    """Taint key (a label key, e.g. partita.dev/dedicated)."""
    operator: TolerationOperator = TolerationOperator.EQUAL
    """Equal: the value must match; Exists: any value."""
    value: LabelValue | None = None
    """Taint value (a label value), for operator Equal."""
    effect: TaintEffect | None = None
    """Taint effect to tolerate; empty: all effects."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule="self.key.indexOf('/') <= 253",
            message="tolerations[].key: the prefix before '/' must be at most 253 characters",
            holds=lambda t: is_label_key(t.key),
            field_path=".key",
        ),
        CelRule(
            rule="self.operator != 'Exists' || !has(self.value)",
            message="tolerations[].value must be empty when tolerations[].operator is Exists",
            holds=lambda t: t.operator != TolerationOperator.EXISTS or t.value is None,
            field_path=".value",
        ),
    )


class StageResources(ApiModel):
    """What each stage or shard container requests."""

    cpu: float = Field(1.0, gt=0, le=256)
    """CPU cores per stage container."""


class EdgeModelSpec(ApiModel):
    """What to serve and under which constraints."""

    source: ModelSourceSpec
    """The ONNX file."""
    input_shapes: dict[str, Annotated[list[Dim], Field(min_length=1, max_length=16)]] = Field(
        default_factory=dict, max_length=16
    )
    """Concrete shapes for inputs with symbolic dimensions, by input name
    (e.g. input_0: [1, 224, 224, 3]); at most 16 dimensions each."""
    data_source: DnsName
    """DevicePool where requests enter and answers return."""
    pools: Annotated[list[DnsName], AfterValidator(unique)] = Field(
        default_factory=list, max_length=32, json_schema_extra=SET
    )
    """DevicePools stages may run on; empty: every pool."""
    tiers: Annotated[list[Tier], AfterValidator(unique)] = Field(
        default_factory=list, max_length=2, json_schema_extra=SET
    )
    """Tiers stages may run in (nodes of pools of other tiers are left out); empty: both."""
    partitioning: Partitioning = Field(
        default_factory=lambda: Partitioning.model_validate({}), json_schema_extra=OBJECT
    )
    """How the model may be split."""
    objective: Objective = Objective.LATENCY
    """What the planner minimises: latency, 1/throughput, or energy per request."""
    slo: Slo | None = None
    """Latency and throughput targets."""
    privacy: Privacy | None = None
    """Keep raw input inside one tier."""
    cascade: Cascade | None = None
    """Answer confident inputs with a small model at the edge."""
    quantization: Quantization = Field(
        default_factory=lambda: Quantization.model_validate({}), json_schema_extra=OBJECT
    )
    """Whether int8 may be used."""
    priority: int = Field(0, ge=0, le=1_000_000)
    """Higher wins when capacity is short; the lowest is refused first (Unschedulable)."""
    rescheduling: Rescheduling = Field(
        default_factory=lambda: Rescheduling.model_validate({}), json_schema_extra=OBJECT
    )
    """Hysteresis against moving too often."""
    tolerations: list[Toleration] = Field(default_factory=list, max_length=16)
    """Taints the stages tolerate."""
    resources: StageResources = Field(
        default_factory=lambda: StageResources.model_validate({}), json_schema_extra=OBJECT
    )
    """Requests of each stage container."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule="!has(self.inputShapes) || "
            "self.inputShapes.all(k, size(k) >= 1 && size(k) <= 256)",
            message="inputShapes keys are input names of 1 to 256 characters",
            holds=lambda s: all(1 <= len(k) <= 256 for k in s.input_shapes),
            field_path=".inputShapes",
        ),
        CelRule(
            rule="!has(self.privacy) || !has(self.tiers) || size(self.tiers) == 0 || "
            "self.privacy.rawInputTier in self.tiers",
            message="privacy.rawInputTier must be one of tiers: no allowed tier could keep "
            "the raw input",
            holds=lambda s: s.privacy is None or not s.tiers or s.privacy.raw_input_tier in s.tiers,
            field_path=".privacy.rawInputTier",
        ),
        CelRule(
            rule="self.partitioning.cutCompression != 'int8' || self.quantization.allowed",
            message="partitioning.cutCompression int8 needs quantization.allowed: true "
            "(it costs accuracy, bounded by quantization.maxAccuracyDrop)",
            holds=lambda s: (
                s.partitioning.cut_compression != Compression.INT8 or s.quantization.allowed
            ),
            field_path=".partitioning.cutCompression",
        ),
    )


class Phase(StrEnum):
    PENDING = "Pending"
    PLANNING = "Planning"
    DEPLOYING = "Deploying"
    READY = "Ready"
    DEGRADED = "Degraded"
    UNSCHEDULABLE = "Unschedulable"
    FAILED = "Failed"


class TensorStatus(StatusModel):
    """A model input or output with its resolved shape."""

    name: str
    dtype: str = ""
    shape: list[int] = Field(default_factory=list)


class ModelStatus(StatusModel):
    """The fetched and profiled model."""

    digest: str = ""
    """sha256 of the file that was verified and profiled."""
    size_bytes: int = Field(0, ge=0)
    """Size of the file."""
    inputs: list[TensorStatus] = Field(default_factory=list)
    """Inputs with the shapes used for profiling."""
    outputs: list[TensorStatus] = Field(default_factory=list)
    """Outputs with their resolved shapes."""
    total_flops: int = Field(0, ge=0)
    """FLOPs of one inference."""
    param_bytes: int = Field(0, ge=0)
    """Bytes of weights."""
    cut_points: int = Field(0, ge=0)
    """Useful places the model can be cut."""
    quantization: QuantizationStatus | None = None
    """The int8 model measured against float32 (with quantization.allowed)."""
    cascade: CascadeModelStatus | None = None
    """The cascade's small model, verified and profiled (with spec.cascade)."""


class AccuracyStatus(StatusModel):
    """An accuracy drop measured against float32 on inputs of the calibration set."""

    metric: str = Field("", max_length=32)
    """top1-disagreement (share of inputs whose top-1 class differs) or relative-error (mean
    over inputs of max |x - fp32| / max |fp32| over the outputs)."""
    drop: float = Field(0.0, ge=0)
    """The measured drop, in that metric."""
    inputs: int = Field(0, ge=0)
    """How many inputs it was measured on."""
    source: str = Field("", max_length=256)
    """What those inputs are: scikit-image photographs, or seeded values."""


class QuantizationStatus(StatusModel):
    """What int8 costs and gives for this model, measured by the operator."""

    mode: str = Field("", max_length=16)
    """static (activation ranges calibrated on the calibration images) or dynamic."""
    accuracy: AccuracyStatus | None = None
    """The drop of the int8 model against float32."""
    speedup: float | None = Field(None, ge=0)
    """float32 time over int8 time for one inference, one thread, on the operator's CPU."""
    weight_bytes: int = Field(0, ge=0)
    """Bytes of the int8 model's weights (float32: status.model.paramBytes)."""
    usable: bool = False
    """Whether the planner may use int8 (the drop is within quantization.maxAccuracyDrop)."""
    message: str = Field("", max_length=1024)
    """Why int8 is usable or refused."""


class CascadeModelStatus(StatusModel):
    """The small model of a cascade."""

    digest: str = ""
    """sha256 of the verified file."""
    size_bytes: int = Field(0, ge=0)
    total_flops: int = Field(0, ge=0)
    """FLOPs of one inference."""
    param_bytes: int = Field(0, ge=0)


class ShardStatus(StatusModel):
    """One server of a stage: the node it is pinned to and its share of the stage's work."""

    node: str
    """Node the server runs on."""
    proportion: float = Field(1.0, ge=0, le=1)
    """Share of the stage's splittable work (1 when the stage is not split)."""


class StageStatus(StatusModel):
    """One stage of a plan: graph nodes [start, end) of the profiled model in one pool."""

    index: int = Field(ge=0)
    pool: str
    """DevicePool the stage runs on."""
    start: int = Field(0, ge=0)
    """First graph node of the stage (in the profile's topological order)."""
    end: int = Field(0, ge=0)
    """One past its last graph node."""
    nodes: list[str] = Field(default_factory=list)
    """Nodes of its servers (one for an unsharded stage)."""
    shards: list[ShardStatus] = Field(default_factory=list)
    """Its servers: one, or one per device it is split across."""
    inputs: list[str] = Field(default_factory=list)
    """Tensors the stage receives (the first 16)."""
    outputs: list[str] = Field(default_factory=list)
    """Tensors the stage sends on (the first 16)."""
    compression: Compression = Compression.NONE
    """Encoding of the tensors arriving at this stage on the wire."""
    int8: bool = False
    """The stage runs an int8-quantized slice."""
    predicted_compute_ms: float | None = Field(None, ge=0)
    """Compute time per request the planner predicts for the stage's slowest server, in ms."""
    predicted_transfer_ms: float | None = Field(None, ge=0)
    """Time to bring its inputs from the previous stage (or the data source), in ms."""
    wire_bytes: int | None = Field(None, ge=0)
    """Bytes of its inputs on the wire per request, after the cut's compression."""


class CascadeStageStatus(StatusModel):
    """Where the cascade's small model runs and how many requests go past it."""

    pool: str
    node: str
    predicted_compute_ms: float | None = Field(None, ge=0)
    """Compute time per request the planner predicts for the small model, in ms."""
    offload_rate: float = Field(0.0, ge=0, le=1)
    """Share of requests forwarded to the main model that the plan was predicted with:
    the measured one once the servers reported it, else cascade.expectedOffloadRate."""
    observed_offload_rate: float | None = Field(None, ge=0, le=1)
    """Share of requests the small model forwarded, as the servers last reported it."""


class PlanStatus(StatusModel):
    """A plan revision: where each stage runs and what is predicted and observed."""

    revision: int = Field(0, ge=0)
    """Increases with every new plan."""
    since: str = Field("", max_length=64)
    """When it started serving (for the plan) or was applied (for a rollout), RFC 3339."""
    stage_count: int = Field(0, ge=0)
    """Number of stages."""
    pools: str = Field("", max_length=1024)
    """Pools of the stages in order, comma-separated."""
    stages: list[StageStatus] = Field(default_factory=list)
    """The stages."""
    predicted_p95_ms: float | None = Field(None, ge=0)
    """End-to-end latency the planner predicts, in ms."""
    observed_p95_ms: float | None = Field(None, ge=0)
    """p95 end-to-end latency measured by the inference servers, in ms."""
    cascade: CascadeStageStatus | None = None
    """The cascade's small model, ahead of the stages."""
    predicted_energy_j: float | None = Field(None, ge=0)
    """Energy per request the planner predicts, in joules: (activeWatts - idleWatts) x
    compute time on every server, plus radioWatts x sending time on links between pools."""
    observed_energy_j: float | None = Field(None, ge=0)
    """The same figure from the compute and hop times the servers measured, in joules."""
    cut_accuracy: AccuracyStatus | None = None
    """Measured drop of the final outputs with the plan's compressed cuts and int8 stages
    against the whole float32 model (None when every stage and cut is float32)."""
    reasons: list[str] = Field(default_factory=list)
    """Why this plan (and not another), in the planner's words."""


class NodeSpeedStatus(StatusModel):
    """How fast one stage container computes this model on one node, and where that is from."""

    node: str
    gflops: float = Field(ge=0)
    """GFLOP/s the planner uses for this model on the node."""
    source: str = Field(max_length=16)
    """declared (the DevicePool's throughputGflops), profiled (the reference speed measured
    for this model times the pool's speedFactor) or learned (profiled, corrected by the
    compute times the node's servers reported)."""


class EdgeModelStatus(StatusModel):
    """What the operator has done with the model so far."""

    observed_generation: int = Field(0, ge=0)
    """The `metadata.generation` this status describes."""
    phase: Phase = Phase.PENDING
    """Pending, Planning, Deploying, Ready, Degraded, Unschedulable or Failed."""
    message: str = Field("", max_length=4096)
    """The latest reason, for a person."""
    conditions: list[Condition] = Field(
        default_factory=list, max_length=16, json_schema_extra=CONDITIONS
    )
    """ModelFetched, Profiled, Planned, Ready."""
    model: ModelStatus | None = None
    """The verified and profiled model."""
    plan: PlanStatus | None = None
    """The plan serving traffic."""
    rollout: PlanStatus | None = None
    """A new plan being deployed next to the serving one; it takes the traffic once every
    one of its servers is ready."""
    node_speeds: list[NodeSpeedStatus] = Field(default_factory=list, max_length=1000)
    """Speed of each node the plan uses, and how it was obtained."""


class EdgeModel(BaseModel):
    """A whole EdgeModel object as the apiserver returns it."""

    model_config = ConfigDict(populate_by_name=True, extra="ignore", frozen=True)

    api_version: Literal["partita.dev/v1alpha1"] = Field("partita.dev/v1alpha1", alias="apiVersion")
    kind: Literal["EdgeModel"] = "EdgeModel"
    metadata: ObjectMeta
    spec: EdgeModelSpec
    status: EdgeModelStatus | None = None

    @classmethod
    def parse(cls, body: Any) -> EdgeModel:
        """Parse a manifest or a kopf body; raises `ManifestError` naming the field."""
        model = parse_manifest(cls, body)
        if len(model.metadata.name) > MAX_NAME_LENGTH:
            from partita.api.errors import ManifestError

            raise ManifestError(
                f"metadata.name: {model.metadata.name!r} is longer than {MAX_NAME_LENGTH} "
                "characters (stage objects derive their names from it)"
            )
        return model
