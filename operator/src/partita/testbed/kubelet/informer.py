"""List+watch caches of the objects the kubelet reads, as plain JSON dicts."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

log = logging.getLogger(__name__)

WATCH_TIMEOUT_S = 10  # watches end and resume this often (a stopped agent's threads exit then)


def obj_key(obj: Mapping[str, Any]) -> str:
    meta = obj["metadata"]
    return f"{meta['namespace']}/{meta['name']}" if meta.get("namespace") else str(meta["name"])


class Informer:
    """A list+watch cache of one resource (relists on 410 Gone or error).

    The cache is replaced, never mutated, so readers in other threads need no lock."""

    def __init__(
        self,
        name: str,
        list_fn: Callable[..., Any],
        on_change: Callable[[], None],
        stop: threading.Event,
        **kwargs: Any,
    ) -> None:
        self.name, self._list, self._on_change, self._stop = name, list_fn, on_change, stop
        self._kwargs = kwargs
        self.items: dict[str, dict[str, Any]] = {}
        self.synced = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"informer-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                rv = self._relist()
                while rv and not self._stop.is_set():
                    rv = self._watch(rv)
            except Exception as exc:
                if self._stop.is_set():
                    return
                log.warning("watch of %s failed (%s); relisting", self.name, exc)
                self._stop.wait(1.0)

    def _relist(self) -> str:
        resp = self._list(_preload_content=False, **self._kwargs)
        doc = json.loads(resp.data)
        self.items = {obj_key(o): o for o in doc.get("items") or []}
        self.synced.set()
        self._on_change()
        return str(doc["metadata"]["resourceVersion"])

    def _watch(self, rv: str) -> str:
        """Apply events from `rv` on; the next version to watch from, or "" to relist."""
        from kubernetes import watch

        w = watch.Watch()
        for ev in w.stream(
            self._list,
            resource_version=rv,
            timeout_seconds=WATCH_TIMEOUT_S,
            allow_watch_bookmarks=True,
            **self._kwargs,
        ):
            if self._stop.is_set():
                w.stop()
                return ""
            kind, obj = ev["type"], ev["raw_object"]
            if kind == "ERROR":
                return ""  # 410 Gone: our version is too old
            rv = obj["metadata"]["resourceVersion"]
            if kind == "BOOKMARK":
                continue
            items = dict(self.items)
            if kind == "DELETED":
                items.pop(obj_key(obj), None)
            else:
                items[obj_key(obj)] = obj
            self.items = items
            self._on_change()
        return rv
