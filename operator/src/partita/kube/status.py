"""Status writes by server-side apply: each writer (the model reconciler, the pool
reconciler, the control loop) applies the status fields it owns under its own field manager,
and conditions merge by type, so no writer overwrites another's fields."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from partita.api.meta import GROUP, VERSION
from partita.kube.actuator import api_error

APPLY = "application/apply-patch+yaml"
PLURALS = {"EdgeModel": "edgemodels", "DevicePool": "devicepools"}


class StatusWriter:
    def __init__(self, api_client: client.ApiClient) -> None:
        self._custom = client.CustomObjectsApi(api_client)

    def apply(self, body: Mapping[str, Any], status: Mapping[str, Any], manager: str) -> None:
        """Apply `status` to the object `body` names (an EdgeModel or a DevicePool)."""
        kind = str(body.get("kind", ""))
        meta = body.get("metadata") or {}
        name, namespace = str(meta.get("name", "")), meta.get("namespace")
        obj = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": kind,
            "metadata": {"name": name, **({"namespace": namespace} if namespace else {})},
            "status": dict(status),
        }
        try:
            if namespace:
                self._custom.patch_namespaced_custom_object_status(
                    GROUP, VERSION, str(namespace), PLURALS[kind], name, obj,
                    field_manager=manager, force=True, _content_type=APPLY,
                )  # fmt: skip
            else:
                self._custom.patch_cluster_custom_object_status(
                    GROUP, VERSION, PLURALS[kind], name, obj,
                    field_manager=manager, force=True, _content_type=APPLY,
                )  # fmt: skip
        except ApiException as exc:
            if exc.status == 404:
                return  # deleted meanwhile: nothing to report on
            raise api_error(exc, f"cannot write the status of {kind} {namespace}/{name}") from None
