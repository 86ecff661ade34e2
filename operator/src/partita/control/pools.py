"""DevicePool reconciliation: which nodes match the selector and how many are Ready."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from partita.api.conditions import set_condition
from partita.api.devicepool import DevicePool
from partita.api.meta import ConditionStatus
from partita.control.inputs import NodeInfo
from partita.control.outcome import Event, EventType, Outcome

READY = "Ready"


def reconcile_pool(pool: DevicePool, nodes: Iterable[NodeInfo], *, now: str) -> Outcome:
    """Status of `pool` given every node of the cluster."""
    selector = pool.spec.node_selector
    members = sorted((n for n in nodes if n.matches(selector)), key=lambda n: n.name)
    ready = [n for n in members if n.ready and n.schedulable]
    old = pool.status
    conditions = tuple(old.conditions) if old else ()
    if ready:
        status, reason = ConditionStatus.TRUE, "NodesReady"
        message = f"{len(ready)} of {len(members)} nodes Ready"
    elif members:
        status, reason = ConditionStatus.FALSE, "NoReadyNodes"
        message = f"none of the {len(members)} matching nodes is Ready and schedulable"
    else:
        status, reason = ConditionStatus.FALSE, "NoMatchingNodes"
        labels = ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
        message = f"no node has the labels {labels}; label nodes or fix spec.nodeSelector"
    before = next((c.status for c in conditions if c.type == READY), None)
    conditions = set_condition(
        conditions,
        READY,
        status,
        reason,
        message,
        now=now,
        generation=pool.metadata.generation,
    )
    events: tuple[Event, ...] = ()
    if before != status:
        kind = EventType.NORMAL if status == ConditionStatus.TRUE else EventType.WARNING
        events = (Event(kind, reason, message),)
    fields: dict[str, Any] = {
        "observedGeneration": pool.metadata.generation,
        "readyNodes": len(ready),
        "totalNodes": len(members),
        "ready": f"{len(ready)}/{len(members)}",
        "nodes": [n.name for n in members],
        "conditions": [c.model_dump(by_alias=True, mode="json") for c in conditions],
    }
    declared = pool.spec.device.throughput_gflops
    if declared is not None:
        fields["throughputGflops"] = declared
    return Outcome(fields, events)


def status_changed(current: Mapping[str, Any] | None, new: Mapping[str, Any]) -> bool:
    """Whether writing `new` would change anything but condition timestamps (node events
    call this to avoid a write per heartbeat)."""
    current = current or {}
    for key, value in new.items():
        if key == "conditions":
            strip = [
                {k: v for k, v in c.items() if k != "lastTransitionTime"}
                for c in (current.get(key) or [])
            ]
            if strip != [{k: v for k, v in c.items() if k != "lastTransitionTime"} for c in value]:
                return True
        elif current.get(key) != value:
            return True
    return False
