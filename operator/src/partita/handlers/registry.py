"""The kopf wiring: a fresh registry per operator run (no handlers registered at import time)
and `run()`, which the CLI and the integration tests both call."""

from __future__ import annotations

import asyncio
import datetime
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import kopf

from partita.api.devicepool import DevicePool
from partita.api.edgemodel import EdgeModel
from partita.api.errors import ManifestError
from partita.api.meta import GROUP, VERSION
from partita.api.rules import plain
from partita.handlers.devicepool import node_view, reconcile_pool, status_changed
from partita.handlers.edgemodel import Profiler, default_profiler, reconcile_model
from partita.handlers.outcome import Backoff, Outcome
from partita.kube.fetch import DEFAULT_MAX_BYTES, ModelFetcher, kube_configmap_reader

ANNOTATION_PREFIX = "kopf.partita.dev"


@dataclass(frozen=True)
class OperatorConfig:
    """Everything `partita operator` is told on its command line or by the chart."""

    cache_dir: Path
    kubeconfig: Path | None = None  # None: in-cluster service account, else ~/.kube/config
    namespaces: tuple[str, ...] = ()  # empty: every namespace (cluster-wide)
    peering: str | None = None  # None: kopf's default peering, standalone when absent
    standalone: bool = False
    max_model_bytes: int = DEFAULT_MAX_BYTES
    # Read by the metrics loop (partita.metrics), passed through from the chart's values.
    prometheus_url: str | None = None
    poll_interval_s: float = 15.0
    queries_file: Path | None = None
    backoff: Backoff = field(default_factory=Backoff)
    liveness_endpoint: str | None = None
    profile: bool = True  # False: skip model analysis (Profiled=Unknown)
    place: bool = True  # False: stop after profiling (no plans, no stage servers)
    server_image: str = "partita-server:0.1.0"
    placement_interval_s: float = 2.0


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


def _apply(outcome: Outcome, body: kopf.Body, patch: kopf.Patch) -> None:
    for key, value in outcome.status.items():
        patch.status[key] = value
    for event in outcome.events:
        kopf.event(body, type=event.type.value, reason=event.reason, message=event.message)
    if outcome.permanent_error is not None:
        raise kopf.PermanentError(outcome.permanent_error)
    if outcome.retry_after_s is not None:
        raise kopf.TemporaryError(outcome.status.get("message", ""), delay=outcome.retry_after_s)


def build_registry(config: OperatorConfig) -> kopf.OperatorRegistry:
    """A registry with Partita's handlers bound to `config`."""
    registry = kopf.OperatorRegistry()
    api_client = _api_client(config.kubeconfig)
    in_cluster = (
        config.kubeconfig is None
        and Path("/var/run/secrets/kubernetes.io/serviceaccount/token").is_file()
    )

    from kubernetes import client

    fetcher = ModelFetcher(
        config.cache_dir / "models",
        max_bytes=config.max_model_bytes,
        read_configmap=kube_configmap_reader(client.CoreV1Api(api_client)),
    )
    profiler: Profiler | None = (
        default_profiler(config.cache_dir / "profiles") if config.profile else None
    )

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

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        if in_cluster:
            return kopf.login_with_service_account(**kwargs)
        return _connection(api_client)

    @kopf.index("", "v1", "nodes", registry=registry, id="nodes")
    def index_node(body: kopf.Body, **_: Any) -> dict[str, Any]:
        return {"all": node_view(body)}

    @kopf.index(GROUP, VERSION, "devicepools", registry=registry, id="pools")
    def index_pool(body: kopf.Body, **_: Any) -> dict[str, Any]:
        return {"all": plain(body)}

    def pool_handler(body: kopf.Body, patch: kopf.Patch, nodes: kopf.Index, **_: Any) -> None:
        try:
            pool = DevicePool.parse(body)
        except ManifestError as exc:
            raise kopf.PermanentError(str(exc)) from None
        outcome = reconcile_pool(pool, nodes.get("all", []), now=_now())
        if status_changed(body.get("status"), outcome.status):
            _apply(outcome, body, patch)

    pools = (GROUP, VERSION, "devicepools")
    on_pool = cast(Any, pool_handler)  # kopf's protocols list every kwarg; we take a few
    for decorator in (kopf.on.create, kopf.on.update, kopf.on.resume):
        decorator(*pools, registry=registry, id="pool-status")(on_pool)

    # Nodes come, go and flip Ready without the pools changing: recount on node events
    # (a timer per pool would put a finalizer on every pool and block its deletion while
    # the operator is down).
    custom = client.CustomObjectsApi(api_client)

    def node_changed(nodes: kopf.Index, pools: kopf.Index, **_: Any) -> None:
        views = list(nodes.get("all", []))
        for body in pools.get("all", []):
            try:
                pool = DevicePool.parse(body)
            except ManifestError:
                continue  # its own handler reports it
            outcome = reconcile_pool(pool, views, now=_now())
            if status_changed(body.get("status"), outcome.status):
                custom.patch_cluster_custom_object_status(
                    GROUP, VERSION, "devicepools", pool.metadata.name, {"status": outcome.status}
                )
                for event in outcome.events:
                    kopf.event(
                        body, type=event.type.value, reason=event.reason, message=event.message
                    )

    kopf.on.event("", "v1", "nodes", registry=registry, id="node-changed")(cast(Any, node_changed))

    def model_handler(body: kopf.Body, patch: kopf.Patch, retry: int, **_: Any) -> None:
        try:
            model = EdgeModel.parse(body)
        except ManifestError as exc:
            raise kopf.PermanentError(str(exc)) from None
        outcome = reconcile_model(
            model, fetcher, profiler, now=_now(), retry=retry, backoff=config.backoff
        )
        _apply(outcome, body, patch)

    models = (GROUP, VERSION, "edgemodels")
    on_model = cast(Any, model_handler)
    kopf.on.create(*models, registry=registry, id="model")(on_model)
    kopf.on.update(*models, registry=registry, id="model", field="spec")(on_model)
    kopf.on.resume(*models, registry=registry, id="model")(on_model)
    if config.place and profiler is not None:
        _register_placement(registry, config, api_client, fetcher, profiler)
    return registry


def _register_placement(
    registry: kopf.OperatorRegistry,
    config: OperatorConfig,
    api_client: Any,
    fetcher: ModelFetcher,
    profiler: Profiler,
) -> None:
    """The closed loop: the metrics poll and the placement loop over profiled models."""
    from partita.handlers import placement

    loaded: dict[tuple[str, str | None, str], tuple[Path, Any]] = {}

    def load(model: EdgeModel) -> tuple[Path, Any] | None:
        spec = model.spec
        key = (spec.source.uri, spec.source.sha256, repr(sorted(spec.input_shapes.items())))
        if key not in loaded:
            fetched = fetcher.fetch(
                spec.source.uri, spec.source.sha256, namespace=model.metadata.namespace
            )
            shapes = {k: list(v) for k, v in spec.input_shapes.items()} or None
            loaded[key] = (fetched.path, profiler(fetched.path, shapes))
        return loaded[key]

    metrics = placement.MetricsState()
    loop = placement.PlacementLoop(
        api_client,
        load,
        metrics,
        image=config.server_image,
        interval_s=config.placement_interval_s,
    )
    placement.register(registry, loop)
    if config.prometheus_url:
        placement.register_metrics(registry, config, metrics)


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
            liveness_endpoint=config.liveness_endpoint,
            stop_flag=stop_flag,
            ready_flag=ready_flag,
        )
    finally:
        loop.close()
