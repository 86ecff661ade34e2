"""Events on the objects Partita reconciles, posted the same way for every writer (the model
and pool reconcilers and the control loop): one core/v1 Event per Outcome event."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any, cast

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from partita.kube.actuator import api_error

COMPONENT = "partita"
MAX_MESSAGE = 1024


class EventRecorder:
    def __init__(self, api_client: client.ApiClient) -> None:
        self._core = client.CoreV1Api(api_client)

    def post(self, body: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        """An Event about the object `body` (an EdgeModel or DevicePool as the API returns it);
        a cluster-scoped object's Events go to the `default` namespace, as kubectl shows them."""
        meta = body.get("metadata") or {}
        namespace = str(meta.get("namespace") or "default")
        now = dt.datetime.now(dt.UTC)
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta.get('name', 'partita')}.", "namespace": namespace},
            "involvedObject": {
                "apiVersion": body.get("apiVersion"),
                "kind": body.get("kind"),
                "name": meta.get("name"),
                "namespace": meta.get("namespace"),
                "uid": meta.get("uid"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:MAX_MESSAGE],
            "firstTimestamp": now.isoformat(),
            "lastTimestamp": now.isoformat(),
            "count": 1,
            "source": {"component": COMPONENT},
            "reportingComponent": COMPONENT,
        }
        try:
            self._core.create_namespaced_event(namespace, cast(Any, event))
        except ApiException as exc:
            if exc.status != 404:  # the namespace is being deleted: nobody will read it
                raise api_error(exc, f"cannot post Event {reason} on {meta.get('name')}") from None
