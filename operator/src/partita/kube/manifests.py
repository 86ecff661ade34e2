"""What a plan revision looks like in Kubernetes: pure rendering, no client.

Per stage (or per shard of a sharded stage) one ConfigMap holding the inference
server's stage spec, one Deployment pinned to the planned node, one Service; per model
one entry Service with a stable name whose selector moves to a new revision only once
that revision is ready (make-before-break, see `partita.kube.actuator`).

With a confidence cascade the revision's entry is the small model's server
(`<model>-r<revision>-cascade`, stage label `cascade`): it answers confident inputs and
forwards the others, as they came, to the main model's first server. An int8 stage runs
a file of its own (the operator's int8 cut of that stage, with its own sha256), whole.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from partita.api import labels
from partita.planner import Compression, Plan, Stage

API_GROUP = "partita.dev"
HOSTNAME = "kubernetes.io/hostname"
ROUTER_CPU = 0.25  # cores of one entry router: it decodes, forwards and encodes
ROUTER_MEMORY = 256 * 2**20
SERVER_PORT = 8000
GRPC_PORT = 8081  # v2 gRPC of a model's entry routers (stage-to-stage hops stay on REST)
H2C = "kubernetes.io/h2c"  # appProtocol of cleartext HTTP/2: gRPC without TLS
FIELD_MANAGER = "partita-operator"


class RenderError(Exception):
    """The plan cannot be expressed as stage servers (says which stage and why)."""


@dataclass(frozen=True)
class EntryPlacement:
    """Where a model's entry routers run: on nodes of the data source pool (its labels),
    `replicas` of them spread over nodes, and away from `avoid` (the nodes of the plan about
    to serve) where the pool has other nodes: a router that shares a node with a stage dies
    with it, and with it the requests it holds."""

    selector: tuple[tuple[str, str], ...] = ()
    replicas: int = 1
    avoid: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelRef:
    """The EdgeModel that owns the objects (for names, labels and owner references)."""

    name: str
    namespace: str
    uid: str
    source_uri: str
    sha256: str | None
    input_shapes: dict[str, tuple[int, ...]]
    data_source_pool: str
    image: str = "partita-server:0.1.0"
    # The cascade's small model (uri, sha256), the output holding its class probabilities
    # and the confidence at or above which it answers.
    cascade_source: tuple[str, str] | None = None
    cascade_output: str | None = None
    cascade_threshold: float | None = None
    # stage index -> (uri, sha256) of the int8 file an int8 stage of the plan runs.
    int8_sources: Mapping[int, tuple[str, str]] = field(default_factory=dict)
    # The model's tolerations as a Pod spec takes them (key, operator, value, effect): the
    # planner placed stages on tainted nodes only where these tolerate the taints.
    tolerations: tuple[tuple[str, str, str | None, str | None], ...] = ()
    # sha256 -> the token that fetches that file from the operator's distribution endpoint,
    # for every file the revision's servers get there (the model, the cascade's small model,
    # each int8 stage's file; their URIs are then that endpoint's URLs); empty when servers
    # read the sources themselves.
    model_tokens: Mapping[str, str] = field(default_factory=dict)
    # Where the model's entry routers run (see `EntryPlacement`).
    entry: EntryPlacement = field(default_factory=EntryPlacement)


def owner_reference(ref: ModelRef) -> dict[str, Any]:
    return {
        "apiVersion": f"{API_GROUP}/v1alpha1",
        "kind": "EdgeModel",
        "name": ref.name,
        "uid": ref.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def object_name(model: str, revision: int, stage: int, shard: int | None = None) -> str:
    base = f"{model}-r{revision}-s{stage}"
    return base if shard is None else f"{base}-k{shard}"


def service_url(name: str, namespace: str) -> str:
    return f"http://{name}.{namespace}.svc:{SERVER_PORT}"


def _labels(
    ref: ModelRef, revision: int, stage: int | None = None, shard: int | None = None
) -> dict[str, str]:
    object_labels = {
        labels.NAME: "partita-server",
        labels.MANAGED_BY: "partita",
        labels.MODEL: ref.name,
        labels.REVISION: str(revision),
    }
    if stage is not None:
        object_labels[labels.STAGE] = str(stage)
        object_labels[labels.COMPONENT] = labels.STAGE_SERVER
    if shard is not None:
        object_labels[labels.SHARD] = str(shard)
    return object_labels


def _shard_names(ref: ModelRef, plan: Plan, stage: Stage) -> list[str]:
    if len(stage.shards) == 1:
        return [object_name(ref.name, plan.revision, stage.index)]
    return [object_name(ref.name, plan.revision, stage.index, j) for j in range(len(stage.shards))]


def gateway_name(model: str, revision: int, stage: int = 0) -> str:
    """The server in front of sharded stage `stage`: it takes the stage's inputs and drives
    the shards (scatter, segment calls, exchanges, gather) from inside their pool."""
    return f"{model}-r{revision}-gw" if stage == 0 else f"{model}-r{revision}-s{stage}-gw"


def gateway_label(stage: int) -> str:
    """The stage label of stage `stage`'s gateway (`gateway_stage` reads it back)."""
    return "gw" if stage == 0 else f"gw-{stage}"


def gateway_stage(label: str) -> int | None:
    """The stage whose gateway carries stage label `label`, None for any other label."""
    if label == "gw":
        return 0
    rest = label.removeprefix("gw-")
    return int(rest) if rest != label and rest.isdigit() else None


def cascade_name(model: str, revision: int) -> str:
    return f"{model}-r{revision}-cascade"


CASCADE_STAGE = "cascade"  # the stage label and name of a cascade's small model


def needs_gateway(plan: Plan) -> bool:
    """A sharded first stage has a gateway in front that clients call."""
    return len(plan.stages[0].shards) > 1


def _gateways(plan: Plan) -> list[int]:
    """The stages that have a gateway: every sharded stage, so that the shards are driven
    over their own pool's LAN whatever pool the stage before them runs in."""
    return [stage.index for stage in plan.stages if len(stage.shards) > 1]


def server_names(model: str, plan: Plan) -> list[str]:
    """The name of every stage server of `plan`'s revision (its Deployment, Service and
    ConfigMap share it): stage by stage, a sharded stage's gateway before its shards."""
    names = [cascade_name(model, plan.revision)] if plan.cascade is not None else []
    for stage in plan.stages:
        if len(stage.shards) == 1:
            names.append(object_name(model, plan.revision, stage.index))
        else:
            names.append(gateway_name(model, plan.revision, stage.index))
            names += [
                object_name(model, plan.revision, stage.index, j) for j in range(len(stage.shards))
            ]
    return names


def _entry_of(ref: ModelRef, plan: Plan, index: int) -> str:
    """The server that takes stage `index`'s inputs: its gateway when it is sharded."""
    stage = plan.stages[index]
    if len(stage.shards) > 1:
        return gateway_name(ref.name, plan.revision, index)
    return object_name(ref.name, plan.revision, index)


def _hops_after(ref: ModelRef, plan: Plan, index: int) -> list[dict[str, Any]]:
    """What the server that ends stage `index` sends its outputs to: a chain hop to the
    next stage's server (or gateway), whose answer becomes its own; none after the last."""
    if index + 1 >= len(plan.stages):
        return []
    nxt = plan.stages[index + 1]
    return [
        {
            "stage": f"stage-{nxt.index}",
            "endpoints": [service_url(_entry_of(ref, plan, nxt.index), ref.namespace)],
            "compression": _compression(nxt.input_compression),
        }
    ]


def _gateway_hops(ref: ModelRef, plan: Plan, index: int) -> list[dict[str, Any]]:
    """A gateway's hops: the fan-out to its stage's shards over their pool's LAN (which
    gathers their parts), then on to the next stage."""
    stage = plan.stages[index]
    endpoints = [service_url(n, ref.namespace) for n in _shard_names(ref, plan, stage)]
    fan_out = {"stage": f"stage-{index}", "endpoints": endpoints, "fan_out": True}
    return [fan_out, *_hops_after(ref, plan, index)]


def stage_specs(ref: ModelRef, plan: Plan) -> dict[str, dict[str, Any]]:
    """The inference server's stage spec for every server of the revision, by object name.

    A sharded stage's shards are driven by its gateway, on the first shard's node: the
    stage before chains to the gateway, which fans out, gathers the parts and carries on.
    """
    stages = plan.stages
    if not stages:
        raise RenderError("the plan has no stages")
    base: dict[str, Any] = {
        "model": ref.name,
        "source": _source(ref, ref.source_uri, ref.sha256),
        "input_shapes": {k: list(v) for k, v in ref.input_shapes.items()},
        "cache_dir": "/var/cache/partita",
    }
    specs: dict[str, dict[str, Any]] = {}
    gateway = needs_gateway(plan)
    small = plan.cascade is not None
    if small:
        if ref.cascade_source is None or ref.cascade_output is None:
            raise RenderError("the plan has a cascade but the model names no small model")
        first = _entry_of(ref, plan, 0)
        uri, sha = ref.cascade_source
        specs[cascade_name(ref.name, plan.revision)] = dict(
            base,
            source=_source(ref, uri, sha),
            stage=CASCADE_STAGE,
            entry=True,
            cascade={"output": ref.cascade_output, "threshold": ref.cascade_threshold},
            # The raw input, as it came, to the main model's first server.
            next=[{"stage": "stage-0", "endpoints": [service_url(first, ref.namespace)]}],
        )
    for index in _gateways(plan):
        stage_inputs = list(stages[index].inputs)
        specs[gateway_name(ref.name, plan.revision, index)] = dict(
            base,
            stage="gateway" if index == 0 else f"stage-{index}-gateway",
            entry=index == 0 and not small,
            inputs=stage_inputs,
            outputs=stage_inputs,
            next=_gateway_hops(ref, plan, index),
        )
    whole = len(stages) == 1 and not gateway
    for stage in stages:
        names = _shard_names(ref, plan, stage)
        int8 = ref.int8_sources.get(stage.index) if stage.int8 else None
        if stage.int8 and (int8 is None or len(names) > 1):
            raise RenderError(
                f"stage {stage.index} runs in int8 but has no int8 file of its own (or is "
                "sharded): the operator cuts one per int8 stage"
            )
        for k, name in enumerate(names):
            entry = stage.index == 0 and not gateway and not small
            spec = dict(base, stage=f"stage-{stage.index}", entry=entry)
            if int8 is not None:
                spec["source"] = _source(ref, *int8)
            elif not whole:
                spec["inputs"] = list(stage.inputs)
                spec["outputs"] = list(stage.outputs)
            if len(names) > 1:
                spec["shard"] = {
                    "index": k,
                    "proportions": [s.proportion for s in stage.shards],
                    **_strategy(plan, stage.index),
                }
            else:
                spec["next"] = _hops_after(ref, plan, stage.index)
            specs[name] = spec
    return specs


def _strategy(plan: Plan, index: int) -> dict[str, str]:
    """The split the planner priced for stage `index`, for its shards to cut the same."""
    predicted = plan.prediction.stages
    strategy = predicted[index].strategy if index < len(predicted) else ""
    return {"strategy": strategy} if strategy else {}


def _source(ref: ModelRef, uri: str, sha256: str | None) -> dict[str, Any]:
    return {
        "uri": uri,
        **({"sha256": sha256} if sha256 else {}),
        **({"distributed": True} if sha256 in ref.model_tokens else {}),
    }


def _compression(c: Compression) -> str:
    return str(c.value) if c is not Compression.NONE else "none"


def render_revision(
    ref: ModelRef, plan: Plan, *, memory_overhead: int = 64 * 2**20
) -> list[dict[str, Any]]:
    """ConfigMaps, Deployments and Services of one plan revision (not the entry Service)."""
    specs = stage_specs(ref, plan)
    objects: list[dict[str, Any]] = []
    cpu = plan.request.cpu
    small = plan.prediction.cascade
    if plan.cascade is not None and small is not None:
        name = cascade_name(ref.name, plan.revision)
        object_labels = {
            **_labels(ref, plan.revision),
            labels.COMPONENT: labels.STAGE_SERVER,
            labels.STAGE: CASCADE_STAGE,
            labels.ENTRY: "true",
        }
        memory = small.memory_bytes + memory_overhead
        objects += _server_objects(
            ref, name, object_labels, plan.cascade.node, cpu, memory, specs[name]
        )
    for index in _gateways(plan):
        name = gateway_name(ref.name, plan.revision, index)
        object_labels = {
            **_labels(ref, plan.revision),
            labels.COMPONENT: labels.STAGE_SERVER,
            labels.STAGE: gateway_label(index),
        }
        if specs[name]["entry"]:
            object_labels[labels.ENTRY] = "true"
        node = plan.stages[index].shards[0].node  # where the first shard runs
        # It drives every segment of the stage, so it may use what a stage server uses;
        # it asks for less, as it idles while the shards compute.
        objects += _server_objects(
            ref, name, object_labels, node, min(cpu, 0.5), 256 * 2**20, specs[name],
            cpu_limit=cpu,
        )  # fmt: skip
    for stage, predicted in zip(plan.stages, plan.prediction.stages, strict=True):
        names = _shard_names(ref, plan, stage)
        for k, (name, placement) in enumerate(zip(names, predicted.shards, strict=True)):
            object_labels = _labels(ref, plan.revision, stage.index, k if len(names) > 1 else None)
            if specs[name]["entry"]:
                object_labels[labels.ENTRY] = "true"
            memory = placement.memory_bytes + memory_overhead
            objects += _server_objects(
                ref, name, object_labels, placement.node, cpu, memory, specs[name]
            )
    return objects


def _server_objects(
    ref: ModelRef,
    name: str,
    object_labels: dict[str, str],
    node: str,
    cpu: float,
    memory: int,
    spec: dict[str, Any],
    *,
    cpu_limit: float | None = None,
) -> list[dict[str, Any]]:
    """The ConfigMap (stage spec), Deployment and Service of one stage server, asking for
    `cpu` cores and limited to `cpu_limit` (default: `cpu`)."""
    meta = {
        "name": name,
        "namespace": ref.namespace,
        "labels": object_labels,
        "ownerReferences": [owner_reference(ref)],
    }
    ports = [{"name": "http", "port": SERVER_PORT, "targetPort": "http"}]
    return [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": meta,
            "data": {"stage.json": json.dumps(spec, indent=1, sort_keys=True)},
        },
        _deployment(ref, name, object_labels, node, cpu, memory, meta, spec, cpu_limit),
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": meta,
            "spec": {"selector": object_labels, "ports": ports},
        },
    ]


def _deployment(
    ref: ModelRef,
    name: str,
    object_labels: dict[str, str],
    node: str,
    cpu: float,
    memory: int,
    meta: dict[str, Any],
    spec: dict[str, Any],
    cpu_limit: float | None = None,
) -> dict[str, Any]:
    """A stage server: one replica pinned to its planned node, with its revision's token and
    the token of the file it fetches from the operator (when it does)."""
    token = {"name": token_name(ref.name, int(object_labels[labels.REVISION])), "key": "token"}
    env: list[dict[str, Any]] = [
        {"name": "PARTITA_INTERNAL_TOKEN", "valueFrom": {"secretKeyRef": token}}
    ]
    source = spec["source"]
    if source.get("distributed"):
        model_token = {**token, "key": model_token_key(source["sha256"])}
        env.append({"name": "PARTITA_MODEL_TOKEN", "valueFrom": {"secretKeyRef": model_token}})
    pinned = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": HOSTNAME, "operator": "In", "values": [node]}]}
                ]
            }
        }
    }
    pod = _pod(ref, name, object_labels, cpu, memory, env, pinned, cpu_limit=cpu_limit)
    return _workload(meta, object_labels, 1, pod, {"type": "Recreate"})


def _workload(
    meta: dict[str, Any],
    selector: dict[str, str],
    replicas: int,
    pod: dict[str, Any],
    strategy: dict[str, Any],
) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta,
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": selector},
            "strategy": strategy,
            "template": pod,
        },
    }


def _pod(
    ref: ModelRef,
    name: str,
    object_labels: dict[str, str],
    cpu: float,
    memory: int,
    env: list[dict[str, Any]],
    affinity: dict[str, Any],
    *,
    grpc: bool = False,
    cpu_limit: float | None = None,
) -> dict[str, Any]:
    """The pod template of a Partita server: its ConfigMap `name` holds its spec; with `grpc`
    it serves v2 gRPC too, on its port `grpc`. It asks for `cpu` cores, limited to
    `cpu_limit` (default: `cpu`)."""
    args = ["--host", "0.0.0.0", "--port", str(SERVER_PORT)]
    ports: list[dict[str, Any]] = [{"name": "http", "containerPort": SERVER_PORT}]
    if grpc:
        args += ["--grpc-port", str(GRPC_PORT)]
        ports.append({"name": "grpc", "containerPort": GRPC_PORT})
    limit = cpu if cpu_limit is None else cpu_limit
    cpu_text = f"{max(round(cpu * 1000), 10)}m"
    limit_text = f"{max(round(limit * 1000), 10)}m"
    mem_text = str(memory)
    spec: dict[str, Any] = {
        "affinity": affinity,
        "automountServiceAccountToken": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 10001,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [
            {
                "name": "server",
                "image": ref.image,
                "command": ["partita-server"],
                "args": args,
                "env": [
                    {"name": "PARTITA_STAGE_SPEC", "value": "/etc/partita/stage.json"},
                    {"name": "PARTITA_CPU_LIMIT", "value": str(limit)},
                    *env,
                ],
                "ports": ports,
                "readinessProbe": {
                    "httpGet": {"path": "/v2/health/ready", "port": "http"},
                    "periodSeconds": 2,
                },
                "resources": {
                    "requests": {"cpu": cpu_text, "memory": mem_text},
                    "limits": {"cpu": limit_text, "memory": mem_text},
                },
                "securityContext": {
                    "allowPrivilegeEscalation": False,
                    "readOnlyRootFilesystem": True,
                    "capabilities": {"drop": ["ALL"]},
                },
                "volumeMounts": [
                    {"name": "spec", "mountPath": "/etc/partita", "readOnly": True},
                    {"name": "cache", "mountPath": "/var/cache/partita"},
                ],
            }
        ],
        "volumes": [
            {"name": "spec", "configMap": {"name": name}},
            {"name": "cache", "emptyDir": {}},
        ],
    }
    if ref.tolerations:
        spec["tolerations"] = [_toleration(t) for t in ref.tolerations]
    return {"metadata": {"labels": object_labels}, "spec": spec}


def _toleration(t: tuple[str, str, str | None, str | None]) -> dict[str, str]:
    key, operator, value, effect = t
    out = {"key": key, "operator": operator}
    if value is not None:
        out["value"] = value
    if effect is not None:
        out["effect"] = effect
    return out


# How long a router keeps retrying a request on the serving revision: long enough to wait out
# the loss of the node that runs both a stage and the operator (the operator's eviction after
# 10 s, its peering record's expiry within 20 s, then the replacement stage's start), and as
# long as tritonclient's own default network timeout.
ENTRY_DEADLINE_S = 60.0


def serving_name(model: str) -> str:
    return f"{model}-serving"


def entry_name(model: str) -> str:
    return f"{model}-entry"


def serving_service(ref: ModelRef, revision: int) -> dict[str, Any]:
    """The Service the entry routers forward to: it selects the serving revision's entry
    server, and moving its selector is the switch from one revision to the next."""
    selector = {
        labels.MODEL: ref.name,
        labels.REVISION: str(revision),
        labels.ENTRY: "true",
        labels.COMPONENT: labels.STAGE_SERVER,
    }
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": serving_name(ref.name),
            "namespace": ref.namespace,
            "labels": {labels.MODEL: ref.name, labels.MANAGED_BY: "partita"},
            "ownerReferences": [owner_reference(ref)],
        },
        "spec": {
            "selector": selector,
            "ports": [{"name": "http", "port": SERVER_PORT, "targetPort": "http"}],
        },
    }


def entry_objects(ref: ModelRef) -> list[dict[str, Any]]:
    """The model's stable entry: the Service named after the model that clients call (v2 REST
    on port `http`, v2 gRPC on port `grpc`), and behind it routers in the data source pool
    that forward every request, REST or gRPC, to the serving revision (over REST) and retry
    it there (inference is idempotent) when a stage fails on the way, until the revision
    that replaces a lost one serves or the deadline passes."""
    name = entry_name(ref.name)
    tags = {
        labels.NAME: "partita-server",
        labels.MANAGED_BY: "partita",
        labels.MODEL: ref.name,
        labels.COMPONENT: labels.ENTRY_ROUTER,
    }
    meta = {
        "name": name,
        "namespace": ref.namespace,
        "labels": tags,
        "ownerReferences": [owner_reference(ref)],
    }
    spec = {
        "model": ref.name,
        "stage": "entry",
        "entry": True,
        "router": True,
        "deadline_s": ENTRY_DEADLINE_S,
        "next": [
            {
                "stage": "serving",
                "endpoints": [service_url(serving_name(ref.name), ref.namespace)],
                "retry": True,
                "timeout_s": ENTRY_DEADLINE_S,
            }
        ],
    }
    place = ref.entry
    routers = {"labelSelector": {"matchLabels": tags}, "topologyKey": HOSTNAME}
    affinity: dict[str, Any] = {
        "podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 50, "podAffinityTerm": routers}  # spread over the pool's nodes
            ]
        }
    }
    node_affinity: dict[str, Any] = {}
    if place.selector:
        node_affinity["requiredDuringSchedulingIgnoredDuringExecution"] = {
            "nodeSelectorTerms": [
                {
                    "matchExpressions": [
                        {"key": k, "operator": "In", "values": [v]} for k, v in place.selector
                    ]
                }
            ]
        }
    if place.avoid:
        away = {"key": HOSTNAME, "operator": "NotIn", "values": sorted(place.avoid)}
        node_affinity["preferredDuringSchedulingIgnoredDuringExecution"] = [
            {"weight": 100, "preference": {"matchExpressions": [away]}}
        ]
    if node_affinity:
        affinity["nodeAffinity"] = node_affinity
    pod = _pod(ref, name, tags, ROUTER_CPU, ROUTER_MEMORY, [], affinity, grpc=True)
    strategy = {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    return [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": meta,
            "data": {"stage.json": json.dumps(spec, indent=1, sort_keys=True)},
        },
        _workload(meta, tags, max(1, place.replicas), pod, strategy),
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                **meta,
                "name": ref.name,
                "annotations": {labels.DATA_SOURCE_POOL: ref.data_source_pool},
            },
            "spec": {
                "selector": tags,
                "ports": [
                    {"name": "http", "port": SERVER_PORT, "targetPort": "http"},
                    {"name": "grpc", "port": GRPC_PORT, "targetPort": "grpc", "appProtocol": H2C},
                ],
            },
        },
    ]


def token_name(model: str, revision: int) -> str:
    """The Secret holding the token a revision's stages present to each other: one per
    revision, so a new revision rotates it and the old one goes with its servers."""
    return f"{model}-r{revision}-token"


def model_token_key(sha256: str) -> str:
    """The key of the token Secret that holds the distribution token of file `sha256`."""
    return f"model-token-{sha256}"


def token_secret(ref: ModelRef, revision: int, token: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": token_name(ref.name, revision),
            "namespace": ref.namespace,
            "labels": {
                labels.MODEL: ref.name,
                labels.REVISION: str(revision),
                labels.MANAGED_BY: "partita",
            },
            "ownerReferences": [owner_reference(ref)],
        },
        "type": "Opaque",
        "stringData": {
            "token": token,
            **{model_token_key(sha): t for sha, t in ref.model_tokens.items()},
        },
    }
