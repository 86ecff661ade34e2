"""A plan revision rendered as Kubernetes objects and stage specs: pure, no cluster."""

from __future__ import annotations

import json

from partita.api import labels
from partita.kube.manifests import (
    EntryPlacement,
    ModelRef,
    entry_objects,
    gateway_stage,
    render_revision,
    server_names,
    serving_service,
    stage_specs,
)
from partita.planner import (
    Compression,
    ModelRequest,
    Plan,
    Prediction,
    ShardPlacement,
    ShardPrediction,
    Stage,
    StagePrediction,
)
from partita_server.spec import StageSpec

REF = ModelRef(
    name="cam",
    namespace="vision",
    uid="u-1",
    source_uri="file:///models/m.onnx",
    sha256="a" * 64,
    input_shapes={"x": (1, 3, 8, 8)},
    data_source_pool="edge-a",
)


def _stage(
    index: int,
    pool: str,
    nodes: list[str],
    inputs: list[str],
    outputs: list[str],
    comp: Compression = Compression.NONE,
) -> Stage:
    share = 1.0 / len(nodes)
    return Stage(
        index=index,
        pool=pool,
        start=index,
        end=index + 1,
        shards=tuple(ShardPlacement(n, share) for n in nodes),
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        input_compression=comp,
    )


def _plan(*stages: Stage, revision: int = 3, strategy: str = "tile") -> Plan:
    return Plan(
        request=ModelRequest(name="cam", data_source="edge-a", namespace="vision"),
        stages=stages,
        revision=revision,
        prediction=Prediction(
            latency_s=0.1,
            throughput_rps=10.0,
            energy_j=1.0,
            cost=0.1,
            stages=tuple(
                StagePrediction(
                    0.01,
                    0.0,
                    0.0,
                    0.01,
                    tuple(ShardPrediction(n, 0.01, 2**20) for n in s.nodes),
                    strategy=strategy if len(s.nodes) > 1 else "",
                )
                for s in stages
            ),
            output_transfer_s=0.0,
        ),
    )


def test_chain_with_sharded_middle_stage_goes_through_its_gateway() -> None:
    """The stage before sends the sharded stage's inputs once over the inter-pool link (with
    the stage's compression) to its gateway, which drives the shards over their own pool's
    LAN and chains on."""
    plan = _plan(
        _stage(0, "edge-a", ["e1"], ["x"], ["h1"]),
        _stage(1, "edge-b", ["b1", "b2"], ["h1"], ["h2"], Compression.FP16),
        _stage(2, "cloud", ["c1"], ["h2"], ["y"], Compression.INT8),
    )
    specs = stage_specs(REF, plan)
    assert set(specs) == {"cam-r3-s0", "cam-r3-s1-gw", "cam-r3-s1-k0", "cam-r3-s1-k1", "cam-r3-s2"}
    assert sorted(server_names("cam", plan)) == sorted(specs)
    first = StageSpec.model_validate(specs["cam-r3-s0"])  # the server accepts what we write
    assert first.entry and [(h.endpoints, h.compression, h.fan_out) for h in first.next] == [
        (("http://cam-r3-s1-gw.vision.svc:8000",), "fp16", False)
    ]
    gw = StageSpec.model_validate(specs["cam-r3-s1-gw"])
    assert not gw.entry and gw.inputs == gw.outputs == ("h1",)
    assert [(h.endpoints, h.compression, h.fan_out) for h in gw.next] == [
        (("http://cam-r3-s1-k0.vision.svc:8000", "http://cam-r3-s1-k1.vision.svc:8000"),
         "none", True),
        (("http://cam-r3-s2.vision.svc:8000",), "int8", False),
    ]  # fmt: skip
    objects = render_revision(REF, plan)
    gw_deployment = next(o for o in objects if o["kind"] == "Deployment"
                         and o["metadata"]["name"] == "cam-r3-s1-gw")  # fmt: skip
    term = gw_deployment["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]  # fmt: skip
    assert term["nodeSelectorTerms"][0]["matchExpressions"][0]["values"] == ["b1"]
    label = gw_deployment["spec"]["template"]["metadata"]["labels"][labels.STAGE]
    assert gateway_stage(label) == 1 and gateway_stage("gw") == 0 and gateway_stage("1") is None
    # It drives every segment: it may use a stage server's CPU, and asks for at most half.
    [server] = gw_deployment["spec"]["template"]["spec"]["containers"]
    cpu = plan.request.cpu
    assert server["resources"]["limits"]["cpu"] == f"{round(cpu * 1000)}m"
    assert server["resources"]["requests"]["cpu"] == f"{round(min(cpu, 0.5) * 1000)}m"
    assert {"name": "PARTITA_CPU_LIMIT", "value": str(cpu)} in server["env"]
    shard = StageSpec.model_validate(specs["cam-r3-s1-k1"])
    assert shard.shard is not None and shard.shard.index == 1 and not shard.next
    # The shards cut the split the planner priced for the stage.
    assert shard.shard.strategy == "tile"
    width = stage_specs(REF, _plan(*plan.stages, strategy="width"))["cam-r3-s1-k0"]
    assert width["shard"]["strategy"] == "width"
    assert not shard.entry
    last = StageSpec.model_validate(specs["cam-r3-s2"])
    assert last.next == () and last.outputs == ("y",)


def test_sharded_first_stage_gets_a_gateway_that_is_the_entry() -> None:
    plan = _plan(_stage(0, "edge-a", ["e1", "e2"], ["x"], ["y"]))
    objects = render_revision(REF, plan)
    deployments = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Deployment"}
    assert set(deployments) == {"cam-r3-gw", "cam-r3-s0-k0", "cam-r3-s0-k1"}
    gw = StageSpec.model_validate(stage_specs(REF, plan)["cam-r3-gw"])
    assert gw.entry and gw.inputs == gw.outputs == ("x",)
    assert [h.fan_out for h in gw.next] == [True]
    entries = [
        n
        for n, d in deployments.items()
        if d["spec"]["template"]["metadata"]["labels"].get(labels.ENTRY) == "true"
    ]
    assert entries == ["cam-r3-gw"]
    # The gateway runs where the first shard runs.
    affinity = deployments["cam-r3-gw"]["spec"]["template"]["spec"]["affinity"]
    term = affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["nodeSelectorTerms"][0]["matchExpressions"][0]["values"] == ["e1"]


def test_objects_are_owned_labelled_and_pinned() -> None:
    plan = _plan(_stage(0, "cloud", ["c1"], ["x"], ["y"]))
    for obj in render_revision(REF, plan):
        meta = obj["metadata"]
        assert meta["namespace"] == "vision"
        assert meta["ownerReferences"][0]["uid"] == "u-1"
        assert meta["labels"]["partita.dev/revision"] == "3"
    spec = stage_specs(REF, plan)["cam-r3-s0"]
    assert "inputs" not in spec  # one stage: the whole model, batch dim kept


def test_clients_call_routers_that_forward_to_the_serving_revision() -> None:
    from dataclasses import replace

    place = EntryPlacement((("partita.dev/pool", "edge-a"),), 2, ("edge-a-1",))
    ref = replace(REF, entry=place)
    serving = serving_service(ref, 7)
    assert serving["metadata"]["name"] == "cam-serving"
    assert serving["spec"]["selector"]["partita.dev/revision"] == "7"
    assert serving["spec"]["selector"][labels.ENTRY] == "true"
    config, routers, service = entry_objects(ref)
    assert service["metadata"]["name"] == "cam"  # what clients call, stable
    assert service["metadata"]["annotations"]["partita.dev/data-source-pool"] == "edge-a"
    assert service["spec"]["selector"] == routers["spec"]["template"]["metadata"]["labels"]
    assert "partita.dev/revision" not in service["spec"]["selector"]
    spec = json.loads(config["data"]["stage.json"])
    assert spec["router"] and spec["next"][0]["endpoints"] == ["http://cam-serving.vision.svc:8000"]
    assert spec["next"][0]["retry"]
    StageSpec.model_validate(spec)  # what the server reads
    pod = routers["spec"]["template"]["spec"]
    assert routers["spec"]["replicas"] == 2
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert terms["nodeSelectorTerms"][0]["matchExpressions"] == [
        {"key": "partita.dev/pool", "operator": "In", "values": ["edge-a"]}
    ]
    spread = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert (
        spread[0]["podAffinityTerm"]["labelSelector"]["matchLabels"] == service["spec"]["selector"]
    )
    # Away from the nodes of the plans that serve, where the pool has other nodes.
    (away,) = pod["affinity"]["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert away["preference"]["matchExpressions"] == [
        {"key": "kubernetes.io/hostname", "operator": "NotIn", "values": ["edge-a-1"]}
    ]


def test_the_model_service_serves_v2_grpc_from_its_routers_and_stages_stay_rest() -> None:
    _, routers, service = entry_objects(REF)
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 8000, "targetPort": "http"},
        {"name": "grpc", "port": 8081, "targetPort": "grpc", "appProtocol": "kubernetes.io/h2c"},
    ]
    (router,) = routers["spec"]["template"]["spec"]["containers"]
    assert router["ports"] == [
        {"name": "http", "containerPort": 8000},
        {"name": "grpc", "containerPort": 8081},
    ]
    assert router["args"][-2:] == ["--grpc-port", "8081"]
    plan = _plan(_stage(0, "cloud", ["c1"], ["x"], ["y"]))
    for obj in render_revision(REF, plan):
        if obj["kind"] == "Deployment":
            (server,) = obj["spec"]["template"]["spec"]["containers"]
            assert "--grpc-port" not in server["args"]
            assert [p["name"] for p in server["ports"]] == ["http"]
        elif obj["kind"] == "Service":
            assert [p["name"] for p in obj["spec"]["ports"]] == ["http"]


def test_pods_tolerate_what_the_model_tolerates_and_use_their_revision_token() -> None:
    from dataclasses import replace

    plan = _plan(_stage(0, "cloud", ["c1"], ["x"], ["y"]))
    ref = replace(REF, tolerations=(("dedicated", "Equal", "vision", "NoSchedule"),
                                    ("gpu", "Exists", None, None)))  # fmt: skip
    deployment = next(o for o in render_revision(ref, plan) if o["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["tolerations"] == [
        {"key": "dedicated", "operator": "Equal", "value": "vision", "effect": "NoSchedule"},
        {"key": "gpu", "operator": "Exists"},
    ]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["PARTITA_INTERNAL_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "cam-r3-token"
    plain = next(o for o in render_revision(REF, plan) if o["kind"] == "Deployment")
    assert "tolerations" not in plain["spec"]["template"]["spec"]


def _cascade_plan(*stages: Stage) -> Plan:
    from dataclasses import replace

    from partita.planner import CascadePlacement

    plan = _plan(*stages)
    small = ShardPrediction("e2", 0.005, 3 * 2**20)
    return replace(
        plan,
        cascade=CascadePlacement("edge-a", "e2"),
        prediction=replace(plan.prediction, cascade=small),
    )


def test_a_cascade_puts_the_small_model_in_front_as_the_entry() -> None:
    from dataclasses import replace

    ref = replace(
        REF,
        cascade_source=("file:///models/small.onnx", "b" * 64),
        cascade_output="prob",
        cascade_threshold=0.9,
    )
    plan = _cascade_plan(
        _stage(0, "edge-a", ["e1"], ["x"], ["h1"]), _stage(1, "cloud", ["c1"], ["h1"], ["y"])
    )
    specs = stage_specs(ref, plan)
    small = StageSpec.model_validate(specs["cam-r3-cascade"])
    assert small.entry and small.stage == "cascade"
    assert small.source.uri == "file:///models/small.onnx" and small.source.sha256 == "b" * 64
    assert small.inputs is None  # the small model whole
    assert small.cascade is not None and small.cascade.output == "prob"
    # Unconfident inputs go as they came to the main model's first stage.
    assert [h.endpoints for h in small.next] == [("http://cam-r3-s0.vision.svc:8000",)]
    assert small.next[0].compression == "none"
    first = StageSpec.model_validate(specs["cam-r3-s0"])
    assert not first.entry and first.cascade is None and first.source.uri == REF.source_uri
    objects = render_revision(ref, plan)
    deployments = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Deployment"}
    labelled = {n: d["spec"]["template"]["metadata"]["labels"] for n, d in deployments.items()}
    assert [n for n, lab in labelled.items() if lab.get(labels.ENTRY) == "true"] == [
        "cam-r3-cascade"
    ]
    assert labelled["cam-r3-cascade"][labels.STAGE] == "cascade"
    pod = deployments["cam-r3-cascade"]["spec"]["template"]["spec"]
    term = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["nodeSelectorTerms"][0]["matchExpressions"][0]["values"] == ["e2"]
    limits = pod["containers"][0]["resources"]["limits"]
    assert int(limits["memory"]) == 3 * 2**20 + 64 * 2**20


def test_an_int8_stage_runs_its_own_int8_file_whole() -> None:
    from dataclasses import replace

    import pytest

    from partita.kube.manifests import RenderError

    first = replace(_stage(0, "edge-a", ["e1"], ["x"], ["h1"]), int8=True)
    plan = _plan(first, _stage(1, "cloud", ["c1"], ["h1"], ["y"]))
    with pytest.raises(RenderError, match="int8"):
        stage_specs(REF, plan)
    ref = replace(REF, int8_sources={0: ("file:///cache/int8/piece.onnx", "c" * 64)})
    specs = stage_specs(ref, plan)
    int8 = StageSpec.model_validate(specs["cam-r3-s0"])
    assert int8.source.uri == "file:///cache/int8/piece.onnx" and int8.source.sha256 == "c" * 64
    assert int8.inputs is None and int8.outputs is None
    fp32 = StageSpec.model_validate(specs["cam-r3-s1"])
    assert fp32.source.uri == REF.source_uri and fp32.inputs == ("h1",)


def test_each_distributed_file_is_fetched_with_its_own_token() -> None:
    from dataclasses import replace

    from partita.kube.manifests import model_token_key, token_secret

    main, small, int8 = REF.sha256 or "", "b" * 64, "c" * 64
    url = "http://partita.partita-system.svc:8080/v1/models/"
    ref = replace(
        REF,
        source_uri=url + main,
        cascade_source=(url + small, small),
        cascade_output="prob",
        cascade_threshold=0.9,
        int8_sources={1: (url + int8, int8)},
        model_tokens={main: "t-main", small: "t-small", int8: "t-int8"},
    )
    plan = _cascade_plan(
        _stage(0, "edge-a", ["e1"], ["x"], ["h1"]),
        replace(_stage(1, "cloud", ["c1"], ["h1"], ["y"]), int8=True),
    )
    specs = stage_specs(ref, plan)
    served = {n: StageSpec.model_validate(s).source for n, s in specs.items()}
    assert {n: (s.sha256, s.distributed) for n, s in served.items()} == {
        "cam-r3-cascade": (small, True),
        "cam-r3-s0": (main, True),
        "cam-r3-s1": (int8, True),
    }
    secret = token_secret(ref, 3, "internal")["stringData"]
    assert {k: v for k, v in secret.items() if k != "token"} == {
        model_token_key(main): "t-main",
        model_token_key(small): "t-small",
        model_token_key(int8): "t-int8",
    }
    for obj in render_revision(ref, plan):
        if obj["kind"] != "Deployment":
            continue
        env = obj["spec"]["template"]["spec"]["containers"][0]["env"]
        (fetch,) = [e for e in env if e["name"] == "PARTITA_MODEL_TOKEN"]
        want = served[obj["metadata"]["name"]].sha256 or ""
        assert fetch["valueFrom"]["secretKeyRef"]["key"] == model_token_key(want)
