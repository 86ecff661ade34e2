"""Carry out a plan revision on the cluster: server-side apply, readiness, make-before-break.

The order is what keeps traffic flowing while a model moves: (1) apply the new
revision's ConfigMaps, Deployments and Services next to the old ones; (2) wait until
every new Deployment is ready; (3) point the entry Service at the new revision; (4) only
then delete older revisions, after a drain period for requests already in flight.
Nothing that still serves traffic is deleted before its replacement is ready.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient

from partita.api import labels
from partita.kube import manifests
from partita.kube.manifests import FIELD_MANAGER, ModelRef
from partita.planner import Plan


class ActuatorError(Exception):
    """The cluster refused an object; the message names it."""


@dataclass(frozen=True)
class Readiness:
    ready: bool
    detail: str  # which Deployments are not ready yet, and why


class Actuator:
    def __init__(self, api_client: client.ApiClient) -> None:
        self._api = api_client
        self._dynamic = DynamicClient(api_client)
        self._core = client.CoreV1Api(api_client)
        self._apps = client.AppsV1Api(api_client)

    def _apply(self, obj: dict[str, Any]) -> None:
        resource = self._dynamic.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
        meta = obj["metadata"]
        try:
            resource.server_side_apply(
                body=obj,
                name=meta["name"],
                namespace=meta.get("namespace"),
                field_manager=FIELD_MANAGER,
                force_conflicts=True,
            )
        except ApiException as exc:
            raise ActuatorError(
                f"{obj['kind']} {meta.get('namespace')}/{meta['name']}: {exc.status} {exc.reason}: "
                f"{(exc.body or '')[:300]}"
            ) from None

    def ensure_token(self, ref: ModelRef) -> None:
        """The stage-to-stage token Secret, created once and kept across revisions."""
        try:
            self._core.read_namespaced_secret(ref.secret_name, ref.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise ActuatorError(f"Secret {ref.secret_name}: {exc.reason}") from None
            self._apply(manifests.token_secret(ref, secrets.token_urlsafe(32)))

    def apply_revision(self, ref: ModelRef, plan: Plan) -> int:
        self.ensure_token(ref)
        objects = manifests.render_revision(ref, plan)
        for obj in objects:
            self._apply(obj)
        return len(objects)

    def revision_readiness(self, ref: ModelRef, plan: Plan) -> Readiness:
        expected = {
            o["metadata"]["name"]
            for o in manifests.render_revision(ref, plan)
            if o["kind"] == "Deployment"
        }
        selector = f"{labels.MODEL}={ref.name},{labels.REVISION}={plan.revision}"
        items: list[Any] = self._apps.list_namespaced_deployment(
            ref.namespace, label_selector=selector
        ).items
        found = {d.metadata.name: d for d in items}
        waiting = []
        for name in sorted(expected):
            d = found.get(name)
            if d is None:
                waiting.append(f"{name}: missing")
                continue
            ready = (d.status.ready_replicas or 0) if d.status else 0
            if ready < (d.spec.replicas or 1):
                waiting.append(f"{name}: {ready}/{d.spec.replicas} ready")
        return Readiness(not waiting, "; ".join(waiting) or "all stage servers ready")

    def switch_entry(self, ref: ModelRef, revision: int) -> None:
        self._apply(manifests.entry_service(ref, revision))

    def delete_revisions(self, ref: ModelRef, keep: set[int]) -> list[str]:
        """Delete the Deployments, Services and ConfigMaps of every revision not in `keep`."""
        selector = f"{labels.MODEL}={ref.name},{labels.REVISION}"
        deleted = []
        listers = (
            (self._apps.list_namespaced_deployment, self._apps.delete_namespaced_deployment),
            (self._core.list_namespaced_service, self._core.delete_namespaced_service),
            (self._core.list_namespaced_config_map, self._core.delete_namespaced_config_map),
        )
        for lister, deleter in listers:
            listed: list[Any] = lister(ref.namespace, label_selector=selector).items
            for item in listed:
                rev = (item.metadata.labels or {}).get(labels.REVISION, "")
                if rev.isdigit() and int(rev) not in keep:
                    try:
                        deleter(item.metadata.name, ref.namespace, propagation_policy="Background")
                        deleted.append(f"{item.kind or type(item).__name__}/{item.metadata.name}")
                    except ApiException as exc:
                        if exc.status != 404:
                            raise ActuatorError(f"{item.metadata.name}: {exc.reason}") from None
        return deleted
