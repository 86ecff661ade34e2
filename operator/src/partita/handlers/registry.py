"""The kopf wiring: a fresh registry per operator run (no handlers at import time) and `run()`.

Handlers are one screen long: parse the object, call a service of `partita.control`, apply
the `Outcome` it returns (`apply_outcome`: the status by server-side apply under the writer's
field manager, the Events, retries as kopf errors). Indexes hold the Nodes,
DevicePools, EdgeModels and stage Deployments; the control loop reads them, and every watch
event wakes it.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import kopf

from partita.api import labels
from partita.api.devicepool import DevicePool
from partita.api.edgemodel import EdgeModel
from partita.api.errors import ManifestError
from partita.api.meta import GROUP, VERSION
from partita.api.rules import plain
from partita.control.catalog import Catalog
from partita.control.distribution import new_key
from partita.control.endpoint import Endpoint
from partita.control.inputs import NodeInfo, node_info
from partita.control.loop import (
    ControlLoop,
    DeploymentInfo,
    LoopConfig,
    PodInfo,
    deployment_info,
    pod_info,
)
from partita.control.models import reconcile_model
from partita.control.outcome import Backoff, Outcome
from partita.control.pools import reconcile_pool, status_changed
from partita.control.quantization import int8_model
from partita.control.telemetry import POOL, PROFILE, Telemetry
from partita.kube.actuator import Actuator, ActuatorError
from partita.kube.events import EventRecorder
from partita.kube.fetch import DEFAULT_MAX_BYTES, ModelFetcher, kube_configmap_reader
from partita.kube.status import StatusWriter

ANNOTATION_PREFIX = "kopf.partita.dev"
# Field managers of the status writers (see partita.kube.status).
MODEL_MANAGER = "partita-models"
POOL_MANAGER = "partita-pools"
LOOP_MANAGER = "partita-control"
PEERING_LIFETIME_S = 20  # kopf touches its record 5-10 s before it would expire

log = logging.getLogger("partita.handlers")


@dataclass(frozen=True)
class OperatorConfig:
    """Everything `partita operator` is told on its command line or by the chart."""

    cache_dir: Path
    kubeconfig: Path | None = None  # None: in-cluster service account, else ~/.kube/config
    namespaces: tuple[str, ...] = ()  # empty: every namespace (cluster-wide)
    peering: str | None = None  # None: kopf's default peering, standalone when absent
    standalone: bool = False
    max_model_bytes: int = DEFAULT_MAX_BYTES
    prometheus_url: str | None = None  # None: no metrics, plans from declared figures only
    poll_interval_s: float = 15.0
    queries_file: Path | None = None
    backoff: Backoff = field(default_factory=Backoff)
    server_image: str = "partita-server:0.1.0"
    # The operator's HTTP endpoint (/healthz, /metrics, /v1/models): HOST:PORT, None: none.
    listen: str | None = None
    # Stage servers fetch models from the endpoint (partita.control.distribution) at this
    # URL (the chart's Service), with tokens under this key; None: they read each source.
    distribution_url: str | None = None
    distribution_key: bytes | None = None


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _api_client(kubeconfig: Path | None) -> Any:
    from kubernetes import client
    from kubernetes import config as kconfig

    cfg = client.Configuration()
    if kubeconfig is not None:
        kconfig.load_kube_config(config_file=str(kubeconfig), client_configuration=cfg)
    else:
        try:
            kconfig.load_incluster_config(client_configuration=cfg)
        except kconfig.ConfigException:
            kconfig.load_kube_config(client_configuration=cfg)
    return client.ApiClient(cfg)


def _connection(api_client: Any) -> kopf.ConnectionInfo:
    """kopf's credentials from the same configuration the kubernetes client uses."""
    cfg = api_client.configuration
    header = cfg.get_api_key_with_prefix("BearerToken") or cfg.get_api_key_with_prefix(
        "authorization"
    )
    parts = header.split(" ", 1) if header else []
    scheme, token = (parts[0], parts[1]) if len(parts) == 2 else (None, parts[0] if parts else None)
    return kopf.ConnectionInfo(
        server=cfg.host,
        ca_path=cfg.ssl_ca_cert,
        insecure=not cfg.verify_ssl,
        scheme=scheme,
        token=token,
        certificate_path=cfg.cert_file,
        private_key_path=cfg.key_file,
    )


class Reporter:
    """Applies an Outcome to the object it is about, the same way for every writer: the
    status by server-side apply under the writer's field manager, then its Events."""

    def __init__(self, writer: StatusWriter, events: EventRecorder, manager: str) -> None:
        self._writer, self._events, self._manager = writer, events, manager

    def __call__(self, body: Mapping[str, Any], outcome: Outcome) -> None:
        if outcome.status:
            self._writer.apply(body, outcome.status, self._manager)
        for event in outcome.events:
            try:
                self._events.post(body, event.type.value, event.reason, event.message)
            except ActuatorError as exc:  # an Event lost is not worth a retry of the step
                log.warning("%s", exc)


def apply_outcome(report: Reporter, body: Mapping[str, Any], outcome: Outcome) -> None:
    """Write the outcome, then retry or stop as it says (kopf's own back-off)."""
    try:
        report(body, outcome)
    except ActuatorError as exc:
        raise kopf.TemporaryError(str(exc), delay=10) from None
    if outcome.permanent_error is not None:
        raise kopf.PermanentError(outcome.permanent_error)
    if outcome.retry_after_s is not None:
        raise kopf.TemporaryError("retrying", delay=outcome.retry_after_s)


@dataclass(frozen=True)
class IndexView:
    """The control loop's view of the cluster: what kopf's indexes hold now."""

    nodes_index: kopf.Index[str, NodeInfo]
    pools_index: kopf.Index[str, dict[str, Any]]
    models_index: kopf.Index[str, dict[str, Any]]
    deployments_index: kopf.Index[str, DeploymentInfo]
    pods_index: kopf.Index[str, PodInfo]

    def models(self) -> Iterable[Mapping[str, Any]]:
        return list(self.models_index.get("all", []))

    def pools(self) -> Iterable[Mapping[str, Any]]:
        return list(self.pools_index.get("all", []))

    def nodes(self) -> Iterable[NodeInfo]:
        return list(self.nodes_index.get("all", []))

    def deployments(self) -> Iterable[DeploymentInfo]:
        return list(self.deployments_index.get("all", []))

    def pods(self) -> Iterable[PodInfo]:
        return list(self.pods_index.get("all", []))


def build_registry(config: OperatorConfig) -> kopf.OperatorRegistry:
    """A registry with Partita's handlers bound to `config`."""
    from kubernetes import client

    from partita.model.profile import profile_model

    registry = kopf.OperatorRegistry()
    api_client = _api_client(config.kubeconfig)
    in_cluster = (
        config.kubeconfig is None
        and Path("/var/run/secrets/kubernetes.io/serviceaccount/token").is_file()
    )
    fetcher = ModelFetcher(
        config.cache_dir / "models",
        max_bytes=config.max_model_bytes,
        read_configmap=kube_configmap_reader(client.CoreV1Api(api_client)),
    )
    profiles = config.cache_dir / "profiles"

    def profiler(path: Path, shapes: Mapping[str, Any] | None) -> Any:
        return profile_model(path, shapes, cache_dir=profiles)

    def quantizer(path: Path, digest: str, shapes: Mapping[str, Any] | None, mode: Any) -> Any:
        return int8_model(path, digest, shapes, mode, config.cache_dir)

    writer, events = StatusWriter(api_client), EventRecorder(api_client)
    models_report = Reporter(writer, events, MODEL_MANAGER)
    pools_report = Reporter(writer, events, POOL_MANAGER)
    loop_holder: list[ControlLoop] = []
    telemetry = Telemetry()

    def wake(**_: Any) -> None:
        for loop in loop_holder:
            loop.wake()

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        # Progress and diff-base in annotations: the status schema is structural and
        # belongs to Partita, kopf's bookkeeping must not be pruned from it.
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
            prefix=ANNOTATION_PREFIX
        )
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix=ANNOTATION_PREFIX, key="last-handled-configuration"
        )
        settings.posting.level = logging.INFO
        settings.watching.server_timeout = 300
        settings.execution.max_workers = 4
        # A replacement pod (a new identity) pauses until the peering record of the one it
        # replaces expires: after at most this long when that one died with its node.
        settings.peering.lifetime = PEERING_LIFETIME_S

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        if in_cluster:
            return kopf.login_with_service_account(**kwargs)
        return _connection(api_client)

    # ---- indexes: what the loop reads ------------------------------------------------------

    @kopf.index("", "v1", "nodes", registry=registry, id="nodes")
    def index_node(body: kopf.Body, **_: Any) -> dict[str, NodeInfo]:
        return {"all": node_info(body)}

    @kopf.index(GROUP, VERSION, "devicepools", registry=registry, id="pools")
    def index_pool(body: kopf.Body, **_: Any) -> dict[str, Any]:
        return {"all": plain(body)}

    @kopf.index(GROUP, VERSION, "edgemodels", registry=registry, id="models")
    def index_model(body: kopf.Body, **_: Any) -> dict[str, Any]:
        return {"all": plain(body)}

    stage_servers = {labels.COMPONENT: labels.STAGE_SERVER}

    def partita_server(value: str | None, **_: Any) -> bool:  # a stage server or a router
        return value in (labels.STAGE_SERVER, labels.ENTRY_ROUTER)

    servers = {labels.COMPONENT: partita_server}

    @kopf.index("apps", "v1", "deployments", labels=servers, registry=registry, id="deployments")
    def index_deployment(body: kopf.Body, **_: Any) -> dict[str, DeploymentInfo] | None:
        info = deployment_info(body)
        return {"all": info} if info is not None else None

    @kopf.index("", "v1", "pods", labels=stage_servers, registry=registry, id="pods")
    def index_pod(body: kopf.Body, **_: Any) -> dict[str, PodInfo] | None:
        info = pod_info(body)
        return {"all": info} if info is not None else None

    # ---- DevicePools: count the nodes ------------------------------------------------------

    def pool_handler(body: kopf.Body, nodes: kopf.Index[str, NodeInfo], **_: Any) -> None:
        try:
            pool = DevicePool.parse(body)
        except ManifestError as exc:
            telemetry.error("DevicePool", POOL, "Invalid")
            raise kopf.PermanentError(str(exc)) from None
        outcome = reconcile_pool(pool, nodes.get("all", []), now=_now())
        telemetry.reconciled("DevicePool", POOL, outcome)
        if status_changed(body.get("status"), outcome.status):
            apply_outcome(pools_report, body, outcome)
        wake()

    for decorator in (kopf.on.create, kopf.on.update, kopf.on.resume):
        decorator(GROUP, VERSION, "devicepools", registry=registry, id="pool-status")(
            cast(Any, pool_handler)
        )

    # Nodes come, go and flip Ready without the pools changing: recount on node events (a
    # timer per pool would put a finalizer on every pool and block its deletion while the
    # operator is down).
    def node_changed(
        nodes: kopf.Index[str, NodeInfo], pools: kopf.Index[str, Any], **_: Any
    ) -> None:
        views = list(nodes.get("all", []))
        for body in pools.get("all", []):
            try:
                pool = DevicePool.parse(body)
            except ManifestError:
                continue  # its own handler reports it
            outcome = reconcile_pool(pool, views, now=_now())
            if status_changed(body.get("status"), outcome.status):
                pools_report(body, outcome)
        wake()

    kopf.on.event("", "v1", "nodes", registry=registry, id="node-changed")(cast(Any, node_changed))

    # ---- EdgeModels: fetch and profile; the loop does the rest -----------------------------

    def model_handler(body: kopf.Body, retry: int, **_: Any) -> None:
        try:
            model = EdgeModel.parse(body)
        except ManifestError as exc:
            telemetry.error("EdgeModel", PROFILE, "Invalid")
            raise kopf.PermanentError(str(exc)) from None
        outcome = reconcile_model(
            model,
            fetcher,
            profiler,
            now=_now(),
            retry=retry,
            backoff=config.backoff,
            quantizer=quantizer,
        )
        telemetry.reconciled("EdgeModel", PROFILE, outcome)
        apply_outcome(models_report, body, outcome)

    on_model = cast(Any, model_handler)
    kopf.on.create(GROUP, VERSION, "edgemodels", registry=registry, id="model")(on_model)
    kopf.on.update(GROUP, VERSION, "edgemodels", registry=registry, id="model", field="spec")(
        on_model
    )
    kopf.on.resume(GROUP, VERSION, "edgemodels", registry=registry, id="model")(on_model)

    for resource, name in (
        ((GROUP, VERSION, "edgemodels"), "wake-models"),
        ((GROUP, VERSION, "devicepools"), "wake-pools"),
    ):
        kopf.on.event(*resource, registry=registry, id=name)(cast(Any, wake))
    kopf.on.event("apps/v1", "deployments", labels=servers, registry=registry,
                  id="wake-deployments")(cast(Any, wake))  # fmt: skip
    kopf.on.event("v1", "pods", labels=stage_servers, registry=registry,
                  id="wake-pods")(cast(Any, wake))  # fmt: skip

    # ---- the control loop and the metrics poll: one task each ------------------------------

    tasks: list[asyncio.Task[None]] = []
    endpoints: list[Endpoint] = []

    def locate(digest: str) -> Path | None:
        path = fetcher.cached(digest)
        return path if path.is_file() else None

    async def start(
        nodes: kopf.Index[str, NodeInfo],
        pools: kopf.Index[str, Any],
        models: kopf.Index[str, Any],
        deployments: kopf.Index[str, DeploymentInfo],
        pods: kopf.Index[str, PodInfo],
        **_: Any,
    ) -> None:
        distributes = config.listen is not None and config.distribution_url is not None
        # Without the chart's key, tokens hold until this process ends.
        key = (config.distribution_key or new_key()) if distributes else None
        loop = ControlLoop(
            IndexView(nodes, pools, models, deployments, pods),
            Actuator(api_client),
            Reporter(writer, events, LOOP_MANAGER),
            Catalog(fetcher, profiler, quantizer=quantizer),
            LoopConfig(
                image=config.server_image,
                metrics_max_age_s=4 * config.poll_interval_s,
                distribution_url=config.distribution_url if distributes else None,
                distribution_key=key,
            ),
            telemetry=telemetry,
        )
        loop_holder.append(loop)
        if config.listen is not None:
            endpoint = Endpoint(
                config.listen,
                healthy=loop.healthy,
                exposition=telemetry.exposition,
                models=(key, locate) if key is not None else None,
            )
            await endpoint.start()
            endpoints.append(endpoint)
        tasks.append(asyncio.create_task(loop.run(), name="partita-control"))
        if config.prometheus_url:
            tasks.append(asyncio.create_task(_poll(config, loop), name="partita-metrics"))

    kopf.on.startup(registry=registry, id="control-loop")(cast(Any, start))

    @kopf.on.cleanup(registry=registry, id="control-loop-stop")
    async def stop(**_: Any) -> None:
        for task in tasks:
            task.cancel()
        for endpoint in endpoints:
            await endpoint.stop()

    return registry


async def _poll(config: OperatorConfig, loop: ControlLoop) -> None:
    """The operator's single Prometheus poll; every observation goes to the loop."""
    from partita.metrics.queries import Queries
    from partita.metrics.reader import MetricsReader, PollLoop

    assert config.prometheus_url is not None
    queries = Queries.load(config.queries_file) if config.queries_file else Queries()
    async with MetricsReader(config.prometheus_url, queries) as reader:
        await PollLoop(reader, config.poll_interval_s, loop.observe).run()


def run(
    config: OperatorConfig,
    *,
    stop_flag: threading.Event | None = None,
    ready_flag: threading.Event | None = None,
) -> None:
    """Run the operator until `stop_flag` is set (or a signal, on the main thread)."""
    registry = build_registry(config)
    clusterwide = not config.namespaces
    loop = asyncio.new_event_loop()
    try:
        asyncio.set_event_loop(loop)
        kopf.run(
            loop=loop,
            registry=registry,
            standalone=config.standalone,
            peering_name=config.peering,
            clusterwide=clusterwide,
            namespaces=config.namespaces,
            stop_flag=stop_flag,
            ready_flag=ready_flag,
        )
    finally:
        loop.close()
