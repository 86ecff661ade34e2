"""What one poll of Prometheus saw, as frozen data the operator folds into its ClusterSnapshot.

Pure: building an Observation from query results, deciding whether it is stale, and saying
what moved between two of them. No I/O and no clock here (`taken_at` and `now` are passed in).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import TypeVar

from .queries import CHART_KEYS

# One series of an instant vector: its labels and its value.
Sample = tuple[Mapping[str, str], float]

NODE_QUERIES = ("node_cpu_utilisation", "node_memory_available", "node_memory_total")
LINK_QUERIES = ("link_rtt", "link_bandwidth")
STAGE_QUERIES = ("stage_compute", "stage_latency_p95")
HOP_QUERIES = ("hop_bytes_rate", "hop_seconds")
MODEL_QUERIES = ("model_latency_p95", "cascade_offload")


@dataclass(frozen=True)
class NodeUsage:
    """What node_exporter says about one node; None where a query gave nothing."""

    cpu_utilisation: float | None = None  # busy share of all its CPUs, 0..1
    memory_available: float | None = None  # bytes
    memory_total: float | None = None  # bytes


@dataclass(frozen=True)
class LinkObservation:
    """A measured path from pool `source` to pool `target` (the key in `Observation.links`)."""

    bandwidth_bps: float | None = None
    rtt_s: float | None = None


@dataclass(frozen=True, order=True)
class StageKey:
    """One stage (or shard) server's series. `stage` is the stage index as text ("0", "1"):
    the servers label themselves `stage-N`, the prefix is dropped so both forms agree."""

    namespace: str
    model: str
    stage: str
    revision: str = ""
    shard: str = ""
    node: str = ""


@dataclass(frozen=True)
class StageObservation:
    compute_s: float | None = None  # mean onnxruntime seconds per run
    latency_p95_s: float | None = None  # p95 request seconds here, later stages included


@dataclass(frozen=True, order=True)
class HopKey:
    namespace: str
    model: str
    stage: str
    next_stage: str
    revision: str = ""
    node: str = ""


@dataclass(frozen=True)
class HopObservation:
    bytes_per_s: float | None = None  # what the stage sends to the next one
    seconds: float | None = None  # mean network time of one hop


@dataclass(frozen=True)
class Expectation:
    """What should be in Prometheus: Ready nodes and the pool pairs the plan may use.
    Anything listed and missing from a poll makes the observation not fresh."""

    nodes: frozenset[str] = frozenset()
    links: frozenset[tuple[str, str]] = frozenset()


@dataclass(frozen=True)
class Observation:
    """One poll: per node, per (source pool, target pool), per stage, per hop, per model
    ((namespace, model) -> observed end-to-end p95 seconds). `fresh` is False when a query
    failed or something expected was missing; `problems` says what, for the condition."""

    taken_at: float
    nodes: Mapping[str, NodeUsage] = field(default_factory=dict)
    links: Mapping[tuple[str, str], LinkObservation] = field(default_factory=dict)
    stages: Mapping[StageKey, StageObservation] = field(default_factory=dict)
    hops: Mapping[HopKey, HopObservation] = field(default_factory=dict)
    models: Mapping[tuple[str, str], float] = field(default_factory=dict)
    # (namespace, model) -> share of a cascade's requests its small model forwarded.
    offload: Mapping[tuple[str, str], float] = field(default_factory=dict)
    fresh: bool = True
    problems: tuple[str, ...] = ()


def _stage_name(value: str) -> str:
    return value.removeprefix("stage-")


def _node_name(labels: Mapping[str, str]) -> str | None:
    if labels.get("node"):
        return labels["node"]
    instance = labels.get("instance", "")
    if not instance:
        return None
    host, sep, port = instance.rpartition(":")
    return host if sep and port.isdigit() and "]" not in port else instance


def _link_ends(labels: Mapping[str, str]) -> tuple[str, str] | None:
    src = labels.get("source_pool") or labels.get("source")
    dst = labels.get("target_pool") or labels.get("target")
    return (src, dst) if src and dst else None


def _stage_key(labels: Mapping[str, str]) -> StageKey | None:
    if not (labels.get("model") and labels.get("stage")):
        return None
    return StageKey(
        labels.get("namespace", ""),
        labels["model"],
        _stage_name(labels["stage"]),
        labels.get("revision", ""),
        labels.get("shard", ""),
        labels.get("node", ""),
    )


def _hop_key(labels: Mapping[str, str]) -> HopKey | None:
    if not (labels.get("model") and labels.get("stage") and labels.get("next_stage")):
        return None
    return HopKey(
        labels.get("namespace", ""),
        labels["model"],
        _stage_name(labels["stage"]),
        _stage_name(labels["next_stage"]),
        labels.get("revision", ""),
        labels.get("node", ""),
    )


def _model_key(labels: Mapping[str, str]) -> tuple[str, str] | None:
    return (labels.get("namespace", ""), labels["model"]) if labels.get("model") else None


_NEEDS = {
    **dict.fromkeys(NODE_QUERIES, "a node or instance label"),
    **dict.fromkeys(LINK_QUERIES, "source_pool and target_pool labels"),
    **dict.fromkeys(STAGE_QUERIES, "model and stage labels"),
    **dict.fromkeys(HOP_QUERIES, "model, stage and next_stage labels"),
    **dict.fromkeys(MODEL_QUERIES, "a model label"),
}

K = TypeVar("K")
V = TypeVar("V")


def _by_key(
    results: Mapping[str, Sequence[Sample]],
    name: str,
    keyer: Callable[[Mapping[str, str]], K | None],
    problems: list[str],
) -> dict[K, float]:
    """Finite values by key; several series per key are averaged (an unaggregated query)."""
    groups: dict[K, list[float]] = defaultdict(list)
    unlabelled = 0
    for labels, value in results.get(name, ()):
        key = keyer(labels)
        if key is None:
            unlabelled += 1
        elif math.isfinite(value):  # NaN: a rate or a quantile over no data
            groups[key].append(value)
    if unlabelled:
        problems.append(
            f"query {CHART_KEYS[name]}: {unlabelled} series without {_NEEDS[name]}, ignored"
        )
    return {k: sum(v) / len(v) for k, v in groups.items()}


def _join(build: Callable[..., V], *columns: Mapping[K, float]) -> dict[K, V]:
    keys: set[K] = set().union(*columns)
    return {k: build(*(c.get(k) for c in columns)) for k in sorted(keys, key=str)}


def build_observation(
    results: Mapping[str, Sequence[Sample]],
    taken_at: float,
    *,
    failures: Sequence[str] = (),
    expect: Expectation | None = None,
) -> Observation:
    """An Observation from the samples of each query (by `Queries` field name).

    `failures` are problems of queries that gave no answer; they make the observation not
    fresh, as does anything in `expect` that no series covers."""
    problems = list(failures)

    def col(name: str, keyer: Callable[[Mapping[str, str]], K | None]) -> dict[K, float]:
        return _by_key(results, name, keyer, problems)

    nodes = _join(NodeUsage, *(col(n, _node_name) for n in NODE_QUERIES))
    links = _join(LinkObservation, col("link_bandwidth", _link_ends), col("link_rtt", _link_ends))
    stages = _join(StageObservation, *(col(n, _stage_key) for n in STAGE_QUERIES))
    hops = _join(HopObservation, *(col(n, _hop_key) for n in HOP_QUERIES))
    models = col("model_latency_p95", _model_key)
    offload = col("cascade_offload", _model_key)
    missing = _missing(results, nodes, links, expect) if expect is not None else []
    problems.extend(missing)
    return Observation(
        taken_at=taken_at,
        nodes=nodes,
        links=links,
        stages=stages,
        hops=hops,
        models=dict(sorted(models.items())),
        offload=dict(sorted(offload.items())),
        fresh=not failures and not missing,
        problems=tuple(problems),
    )


def _missing(
    results: Mapping[str, Sequence[Sample]],
    nodes: Mapping[str, NodeUsage],
    links: Mapping[tuple[str, str], LinkObservation],
    expect: Expectation,
) -> list[str]:
    """What `expect` lists that a query that ran did not report."""
    out: list[str] = []
    node_fields = [("node_cpu_utilisation", "cpu_utilisation"),
                   ("node_memory_available", "memory_available")]  # fmt: skip
    for name in sorted(expect.nodes):
        usage = nodes.get(name, NodeUsage())
        lacking = [
            CHART_KEYS[q]
            for q, attr in node_fields
            if q in results and getattr(usage, attr) is None
        ]
        if lacking:
            out.append(f"no node metrics for {name} ({', '.join(lacking)})")
    link_fields = [("link_bandwidth", "bandwidth_bps"), ("link_rtt", "rtt_s")]
    for src, dst in sorted(expect.links):
        seen = links.get((src, dst), LinkObservation())
        lacking = [
            CHART_KEYS[q] for q, attr in link_fields if q in results and getattr(seen, attr) is None
        ]
        if lacking:
            out.append(f"no link metrics for {src}->{dst} ({', '.join(lacking)})")
    return out


def is_stale(observation: Observation | None, now: float, max_age: float) -> bool:
    """True when there is no observation, it is not fresh, or it was taken over `max_age`
    seconds before `now` (same clock as `taken_at`)."""
    if observation is None or not observation.fresh:
        return True
    return now - observation.taken_at > max_age


# Below these magnitudes a relative change is noise (an idle node at 5 % CPU moving to 7 %).
FLOORS = {
    "cpu_utilisation": 0.1,
    "memory_available": 64 * 2**20,
    "memory_total": 64 * 2**20,
    "bandwidth_bps": 1e6,
    "rtt_s": 1e-3,
    "compute_s": 1e-3,
    "latency_p95_s": 1e-3,
    "bytes_per_s": 1e4,
    "seconds": 1e-3,
    "p95_s": 1e-3,
}


def _moved(old: float | None, new: float | None, floor: float, rel: float) -> bool:
    if old is None or new is None:
        return (old is None) != (new is None)
    return abs(new - old) > rel * max(abs(old), floor)


def _fmt(value: float | None) -> str:
    return "none" if value is None else f"{value:.4g}"


def _values(a: object, b: object) -> list[tuple[str, float | None, float | None]]:
    """(quantity, old, new) pairs of two observations of one thing (a dataclass or a p95)."""
    if isinstance(a, float) and isinstance(b, float):
        return [("p95_s", a, b)]
    return [(f.name, getattr(a, f.name), getattr(b, f.name)) for f in fields(a)]  # type: ignore[arg-type]


def _compare(
    kind: str,
    old: Mapping[K, object],
    new: Mapping[K, object],
    label: Callable[[K], str],
    rel: float,
) -> Iterator[str]:
    for key in sorted({*old, *new}, key=str):
        name = label(key)
        if key not in new:
            yield f"{kind} {name} gone"
        elif key not in old:
            yield f"{kind} {name} appeared"
        else:
            for attr, va, vb in _values(old[key], new[key]):
                if _moved(va, vb, FLOORS[attr], rel):
                    yield f"{kind} {name} {attr} {_fmt(va)} -> {_fmt(vb)}"


def significant_change(
    old: Observation | None,
    new: Observation,
    rel: float = 0.2,
    *,
    kinds: Collection[str] = ("node", "link", "stage", "hop", "model"),
) -> list[str]:
    """What moved by more than `rel` (of the old value, or of a per-quantity floor when it is
    small), appeared or disappeared, as lines such as `link edge-a->cloud bandwidth_bps
    1e+08 -> 5e+06`. Compare with the observation the current plan was made from, not the
    previous poll, so slow drift adds up and jitter around it does not."""
    if old is None:
        return ["first observation"]
    out: list[str] = []
    if "node" in kinds:
        out.extend(_compare("node", old.nodes, new.nodes, str, rel))
    if "link" in kinds:
        out.extend(_compare("link", old.links, new.links, _link_label, rel))
    if "stage" in kinds:
        out.extend(_compare("stage", old.stages, new.stages, _stage_label, rel))
    if "hop" in kinds:
        out.extend(_compare("hop", old.hops, new.hops, _hop_label, rel))
    if "model" in kinds:
        out.extend(_compare("model", old.models, new.models, "/".join, rel))
    return out


def _link_label(k: tuple[str, str]) -> str:
    return f"{k[0]}->{k[1]}"


def _stage_label(k: StageKey) -> str:
    extra = "".join(
        f" {name}={value}"
        for name, value in (("revision", k.revision), ("shard", k.shard), ("node", k.node))
        if value
    )
    return f"{k.namespace}/{k.model} stage {k.stage}{extra}"


def _hop_label(k: HopKey) -> str:
    extra = "".join(
        f" {name}={value}" for name, value in (("revision", k.revision), ("node", k.node)) if value
    )
    return f"{k.namespace}/{k.model} stage {k.stage}->{k.next_stage}{extra}"
