"""An Observation in the terms `partita.planner.manifests` understands: Node annotations
(`partita.dev/cpu-used`, `partita.dev/memory-used`) and LinkEstimate documents.

So the operator builds its ClusterSnapshot the same way `partita plan --cluster FILE` does:
`snapshot_from_manifests(with_observation(docs, observation), ...)`.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Iterable, Mapping
from typing import Any

from partita.planner.errors import PlannerError
from partita.planner.manifests import quantity

from .observation import Observation

CPU_USED = "partita.dev/cpu-used"
MEMORY_USED = "partita.dev/memory-used"
LINK_API_VERSION = "partita.dev/v1alpha1"


def _allocatable(doc: Mapping[str, Any], name: str) -> tuple[float | None, float | None]:
    alloc = (doc.get("status") or {}).get("allocatable") or {}
    out: list[float | None] = []
    for key in ("cpu", "memory"):
        try:
            out.append(quantity(alloc[key], f"Node {name}.status.allocatable.{key}"))
        except (KeyError, PlannerError):
            out.append(None)
    return out[0], out[1]


def _node_annotations(
    observation: Observation, name: str, cpu: float | None, memory: float | None
) -> dict[str, str]:
    usage = observation.nodes.get(name)
    if usage is None:
        return {}
    out: dict[str, str] = {}
    if usage.cpu_utilisation is not None and cpu is not None:
        busy = min(max(usage.cpu_utilisation, 0.0), 1.0)
        out[CPU_USED] = f"{busy * cpu:.3f}"
    if usage.memory_available is not None:
        # What the node's processes hold (all of them: a noisy neighbour counts too), capped
        # at what Kubernetes lets pods have.
        if usage.memory_total is not None:
            used = usage.memory_total - usage.memory_available
        elif memory is not None:
            used = memory - usage.memory_available
        else:
            return out
        ceiling = memory if memory is not None else used
        out[MEMORY_USED] = str(int(min(max(used, 0.0), max(ceiling, 0.0))))
    return out


def to_manifest_overlays(
    observation: Observation,
    nodes: Iterable[Mapping[str, Any]] = (),
    pools: Collection[str] | None = None,
) -> tuple[dict[str, dict[str, str]], list[dict[str, Any]]]:
    """(node name -> annotations, LinkEstimate docs) for what the observation measured.

    CPU in use is utilisation × the node's allocatable CPU, so it needs the Node documents
    (`nodes`); memory in use is MemTotal − MemAvailable, capped at allocatable memory. A link
    becomes a LinkEstimate only when both its bandwidth and RTT were measured and, if `pools`
    is given, both ends are among them (the planner refuses links to undeclared pools).
    """
    annotations: dict[str, dict[str, str]] = {}
    seen: set[str] = set()
    for doc in nodes:
        name = str((doc.get("metadata") or {}).get("name", ""))
        seen.add(name)
        found = _node_annotations(observation, name, *_allocatable(doc, name))
        if found:
            annotations[name] = found
    for name in observation.nodes:
        if name not in seen:
            found = _node_annotations(observation, name, None, None)
            if found:
                annotations[name] = found
    links = [
        {
            "apiVersion": LINK_API_VERSION,
            "kind": "LinkEstimate",
            "metadata": {"name": f"{src}-to-{dst}"},
            "spec": {
                "from": src,
                "to": dst,
                "bandwidthMbps": link.bandwidth_bps / 1e6,
                "rttMs": link.rtt_s * 1e3,
            },
        }
        for (src, dst), link in observation.links.items()
        if link.bandwidth_bps is not None
        and link.bandwidth_bps > 0
        and link.rtt_s is not None
        and (pools is None or (src in pools and dst in pools))
    ]
    return annotations, links


def with_observation(
    docs: Iterable[Mapping[str, Any]], observation: Observation | None
) -> list[dict[str, Any]]:
    """The documents with measured use on every Node and a LinkEstimate per measured link
    between declared DevicePools appended (documents are copied, never changed in place)."""
    out = [copy.deepcopy(dict(d)) for d in docs]
    if observation is None:
        return out
    node_docs = [d for d in out if d.get("kind") == "Node"]
    pools = {
        str((d.get("metadata") or {}).get("name")) for d in out if d.get("kind") == "DevicePool"
    }
    annotations, links = to_manifest_overlays(observation, node_docs, pools)
    for doc in node_docs:
        name = str((doc.get("metadata") or {}).get("name", ""))
        if name in annotations:
            meta = doc.setdefault("metadata", {})
            meta["annotations"] = {**(meta.get("annotations") or {}), **annotations[name]}
    return links + out  # measured links first: the snapshot takes the first of a pair
