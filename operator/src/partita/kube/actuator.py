"""Carry out a plan revision on the cluster: server-side apply, entry switch, deletion.

The control loop decides the order that keeps traffic flowing while a model moves: apply the
new revision's ConfigMaps, Deployments and Services next to the old ones; point the entry
Service at it once every new server is ready; delete older revisions only after a drain
period for requests already in flight. Nothing here decides; every call is idempotent.
"""

from __future__ import annotations

import json
import secrets
from typing import Any, cast

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient

from partita.api import labels
from partita.kube import manifests
from partita.kube.manifests import FIELD_MANAGER, ModelRef
from partita.planner import Plan


class ActuatorError(Exception):
    """The API server refused a call; `reason` is its CamelCase reason (Forbidden, Invalid,
    Conflict...) and the message names the object."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def api_error(exc: ApiException, what: str) -> ActuatorError:
    """An ActuatorError naming `what`, with the Status reason and message the server sent."""
    reason, message = "", ""
    try:
        doc = json.loads(exc.body or "")
        reason, message = str(doc.get("reason") or ""), str(doc.get("message") or "")
    except (TypeError, ValueError):
        pass
    reason = reason or (str(exc.reason or "").title().replace(" ", "") or "ApiError")
    return ActuatorError(reason, f"{what}: {exc.status} {reason}: {message or exc.reason}"[:1000])


class Actuator:
    def __init__(self, api_client: client.ApiClient) -> None:
        self._dynamic = DynamicClient(api_client)
        self._core = client.CoreV1Api(api_client)
        self._apps = client.AppsV1Api(api_client)

    def _apply(self, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        what = f"{obj['kind']} {meta.get('namespace')}/{meta['name']}"
        try:
            resource = self._dynamic.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
            resource.server_side_apply(
                body=obj,
                name=meta["name"],
                namespace=meta.get("namespace"),
                field_manager=FIELD_MANAGER,
                force_conflicts=True,
            )
        except ApiException as exc:
            raise api_error(exc, f"cannot apply {what}") from None

    def ensure_token(self, ref: ModelRef, revision: int) -> None:
        """The revision's stage-to-stage token Secret: created once, never read back (the
        operator needs no read access to Secrets), gone with the revision."""
        secret = manifests.token_secret(ref, revision, secrets.token_urlsafe(32))
        try:
            self._core.create_namespaced_secret(ref.namespace, cast(Any, secret))
        except ApiException as exc:
            if exc.status != 409:  # AlreadyExists: made by an earlier attempt, keep it
                name = secret["metadata"]["name"]
                raise api_error(exc, f"cannot create Secret {ref.namespace}/{name}") from None

    def apply_revision(self, ref: ModelRef, plan: Plan) -> int:
        """The revision's objects, and the model's entry routers (idempotent: they start
        with the first revision, so they are ready when it is)."""
        self.ensure_token(ref, plan.revision)
        objects = manifests.render_revision(ref, plan) + manifests.entry_objects(ref)
        for obj in objects:
            self._apply(obj)
        return len(objects)

    def switch_entry(self, ref: ModelRef, revision: int) -> None:
        """Point the serving Service at `revision` (its routers and the client-facing Service
        are applied too: idempotent, and there from the first revision on)."""
        self._apply(manifests.serving_service(ref, revision))
        for obj in manifests.entry_objects(ref):
            self._apply(obj)

    def delete_revisions(self, ref: ModelRef, keep: set[int]) -> list[str]:
        """Delete the Deployments, Services and ConfigMaps of every revision not in `keep`."""
        selector = f"{labels.MODEL}={ref.name},{labels.REVISION}"
        deleted = []
        apps, core = self._apps, self._core
        revisions: set[int] = set()
        kinds = (
            ("Deployment", apps.list_namespaced_deployment, apps.delete_namespaced_deployment),
            ("Service", core.list_namespaced_service, core.delete_namespaced_service),
            ("ConfigMap", core.list_namespaced_config_map, core.delete_namespaced_config_map),
        )
        for kind, lister, deleter in kinds:
            try:
                listed: list[Any] = lister(ref.namespace, label_selector=selector).items
            except ApiException as exc:
                raise api_error(exc, f"cannot list {kind}s of {ref.namespace}/{ref.name}") from None
            for item in listed:
                rev = (item.metadata.labels or {}).get(labels.REVISION, "")
                if not rev.isdigit() or int(rev) in keep:
                    continue
                revisions.add(int(rev))
                if self._delete(kind, deleter, item.metadata.name, ref.namespace):
                    deleted.append(f"{kind}/{item.metadata.name}")
        for revision in sorted(revisions):  # Secrets are deleted by name: never listed
            name = manifests.token_name(ref.name, revision)
            if self._delete("Secret", core.delete_namespaced_secret, name, ref.namespace):
                deleted.append(f"Secret/{name}")
        return deleted

    @staticmethod
    def _delete(kind: str, deleter: Any, name: str, namespace: str) -> bool:
        try:
            deleter(name, namespace, propagation_policy="Background")
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise api_error(exc, f"cannot delete {kind} {namespace}/{name}") from None
        return True
