"""The metrics simulator's live state: what every simulated node and pool-to-pool link reports.

The state is one JSON file. `partita testbed set`, scenarios and the agent change it by writing a
new file atomically (temp file + rename); the simulator re-reads it when it changes. A file rather
than an RPC keeps the simulator stateless across restarts and lets any process change the state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from partita.testbed.errors import TestbedError
from partita.testbed.layout import Layout, parse_duration, parse_rate

STATE_VERSION = 1

# What an idle simulated node reports until a scenario says otherwise.
IDLE_CPU = 0.05
IDLE_MEMORY = 0.25
IDLE_NETWORK_BYTES_PER_S = 10_000.0


@dataclass(frozen=True)
class NodeState:
    name: str
    pool: str
    tier: str
    cpu: int
    memory_bytes: int
    cpu_utilisation: float = IDLE_CPU  # 0..1 of all the node's CPUs
    memory_used: float = IDLE_MEMORY  # 0..1 of memory_bytes
    rx_bytes_per_s: float = IDLE_NETWORK_BYTES_PER_S
    tx_bytes_per_s: float = IDLE_NETWORK_BYTES_PER_S
    up: bool = True  # a node that is down exports nothing and probes nothing


@dataclass(frozen=True)
class LinkState:
    """The path from every node of pool `source` to pool `target`, as probes measure it."""

    source: str
    target: str
    bandwidth_bps: float
    rtt_s: float


@dataclass(frozen=True)
class SimState:
    nodes: tuple[NodeState, ...]
    links: tuple[LinkState, ...]
    jitter: float = 0.0  # each reported value moves by up to ±jitter (a fraction) per scrape
    seed: int = 0

    @classmethod
    def from_layout(cls, layout: Layout, *, jitter: float = 0.0, seed: int = 0) -> SimState:
        nodes = tuple(
            NodeState(n.name, n.pool, n.tier, n.cpu, n.memory_bytes) for n in layout.nodes
        )
        links = tuple(
            LinkState(lk.source, lk.target, lk.bandwidth_bps, lk.rtt_s) for lk in layout.links
        )
        return cls(nodes, links, jitter, seed)

    @property
    def pools(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(n.pool for n in self.nodes))

    def node(self, name: str) -> NodeState:
        for n in self.nodes:
            if n.name == name:
                return n
        known = ", ".join(n.name for n in self.nodes)
        raise TestbedError(f"unknown node {name!r}; the simulator has: {known}")

    def link(self, source: str, target: str) -> LinkState:
        for lk in self.links:
            if (lk.source, lk.target) == (source, target):
                return lk
        raise TestbedError(f"no link {source}:{target}; links: {self._link_names()}")

    def _link_names(self) -> str:
        return ", ".join(f"{lk.source}:{lk.target}" for lk in self.links)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "jitter": self.jitter,
            "seed": self.seed,
            "nodes": [dataclasses.asdict(n) for n in self.nodes],
            "links": [dataclasses.asdict(lk) for lk in self.links],
        }

    @classmethod
    def from_json(cls, doc: Any, where: str = "state") -> SimState:
        try:
            if doc.get("version") != STATE_VERSION:
                raise ValueError(f"version {doc.get('version')!r}, expected {STATE_VERSION}")
            return cls(
                tuple(NodeState(**n) for n in doc["nodes"]),
                tuple(LinkState(**lk) for lk in doc["links"]),
                float(doc.get("jitter", 0.0)),
                int(doc.get("seed", 0)),
            )
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise TestbedError(
                f"{where}: not a simulator state ({exc}); `partita testbed up` writes a fresh one"
            ) from None


def load(path: Path) -> SimState:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise TestbedError(
            f"{path}: no simulator state; is the local cluster up? (`partita testbed up`)"
        ) from None
    except (OSError, ValueError) as exc:
        raise TestbedError(f"{path}: cannot read the simulator state: {exc}") from None
    return SimState.from_json(doc, str(path))


def save(path: Path, state: SimState) -> None:
    """Write atomically, so the simulator never reads half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(state.to_json(), out, indent=1)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    lock = path.with_name(f".{path.name}.lock")
    with lock.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def update(path: Path, change: Callable[[SimState], SimState]) -> SimState:
    """Read, change and write the state under a file lock, so a scenario and a `set` from
    another shell never lose each other's changes."""
    with _locked(path):
        state = change(load(path))
        save(path, state)
        return state


# ---- the `partita testbed set` grammar ----------------------------------------------------

NODE_KEYS = {
    "cpu": "cpu_utilisation",
    "memory": "memory_used",
    "rx": "rx_bytes_per_s",
    "tx": "tx_bytes_per_s",
    "up": "up",
}
LINK_KEYS = {"bandwidth": "bandwidth_bps", "rtt": "rtt_s"}
SIM_KEYS = {"jitter": "jitter", "seed": "seed"}
_KIND_NAMES: dict[str, Literal["node", "link", "sim"]] = {
    "node": "node",
    "link": "link",
    "sim": "sim",
}
TARGET_FORMS = "node=NAME, link=SOURCE_POOL:TARGET_POOL (either may be *), or sim"


class AssignmentError(TestbedError):
    """A bad `KEY=VALUE`; `key` lets a scenario point at `steps[i].KEY`."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key
        self.detail = message


@dataclass(frozen=True)
class Assignment:
    """A parsed `set` command: which node/link/sim, and the new field values."""

    kind: Literal["node", "link", "sim"]
    target: str  # as written, for messages
    node: str = ""
    source: str = ""  # pool or "*"
    dest: str = ""  # pool or "*"
    changes: tuple[tuple[str, float | int | bool], ...] = ()

    def describe(self) -> str:
        return f"{self.target} " + " ".join(f"{k}={v}" for k, v in self.changes)


def _fraction(raw: str) -> float:
    text = raw.strip()
    value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    if not 0.0 <= value <= 1.0:
        raise ValueError("must be a fraction between 0 and 1 (e.g. 0.9 or 90%)")
    return value


def _bool(raw: str) -> bool:
    text = raw.strip().lower()
    if text in {"true", "yes", "1", "on"}:
        return True
    if text in {"false", "no", "0", "off"}:
        return False
    raise ValueError("must be true or false")


def _byte_rate(raw: str) -> float:
    return parse_rate(raw) / 8.0


def _positive_rate(raw: str) -> float:
    value = parse_rate(raw)
    if value <= 0:
        raise ValueError("must be above 0 (e.g. 5Mbit)")
    return value


def _seed(raw: str) -> int:
    return int(raw)


_PARSERS: dict[str, Callable[[str], float | int | bool]] = {
    "cpu_utilisation": _fraction,
    "memory_used": _fraction,
    "rx_bytes_per_s": _byte_rate,
    "tx_bytes_per_s": _byte_rate,
    "up": _bool,
    "bandwidth_bps": _positive_rate,
    "rtt_s": parse_duration,
    "jitter": _fraction,
    "seed": _seed,
}
_EXAMPLES = {
    "cpu": "0.9 or 90%",
    "memory": "0.7 or 70%",
    "rx": "10Mbit",
    "tx": "10Mbit",
    "up": "false",
    "bandwidth": "5Mbit",
    "rtt": "40ms",
    "jitter": "0.2",
    "seed": "7",
}


def parse_assignment(target: str, values: Mapping[str, object]) -> Assignment:
    """Check the grammar only; names are checked against a state by `apply`."""
    kind, _, name = target.partition("=")
    kind = kind.strip()
    name = name.strip()
    if kind == "node" and name:
        keys, node, source, dest = NODE_KEYS, name, "", ""
    elif kind == "link" and name:
        source, sep, dest = (p.strip() for p in name.partition(":"))
        if not sep or not source or not dest:
            raise AssignmentError(
                "link", f"{target!r}: a link is SOURCE_POOL:TARGET_POOL (e.g. link=edge-a:cloud)"
            )
        keys, node = LINK_KEYS, ""
    elif kind == "sim" and not name:
        keys, node, source, dest = SIM_KEYS, "", "", ""
    else:
        raise AssignmentError(kind or "target", f"{target!r}: expected {TARGET_FORMS}")
    if not values:
        raise AssignmentError(
            kind, f"{target}: nothing to set; give KEY=VALUE with KEY one of {', '.join(keys)}"
        )
    changes: list[tuple[str, float | int | bool]] = []
    for key, raw in values.items():
        if key not in keys:
            raise AssignmentError(
                key, f"{target}: unknown key {key!r}; keys for {kind}: {', '.join(keys)}"
            )
        field = keys[key]
        try:
            changes.append((field, _PARSERS[field](str(raw))))
        except ValueError as exc:
            raise AssignmentError(
                key, f"{target} {key}={raw!r}: {exc} (example: {key}={_EXAMPLES[key]})"
            ) from None
    return Assignment(_KIND_NAMES[kind], target, node, source, dest, tuple(changes))


def apply(state: SimState, assignment: Assignment) -> SimState:
    changes: dict[str, Any] = dict(assignment.changes)
    if assignment.kind == "sim":
        return dataclasses.replace(state, **changes)
    if assignment.kind == "node":
        state.node(assignment.node)  # raises, listing the nodes
        nodes = tuple(
            dataclasses.replace(n, **changes) if n.name == assignment.node else n
            for n in state.nodes
        )
        return dataclasses.replace(state, nodes=nodes)
    pools = state.pools
    for end in (assignment.source, assignment.dest):
        if end != "*" and end not in pools:
            raise TestbedError(
                f"{assignment.target}: unknown pool {end!r}; pools: {', '.join(pools)}"
            )

    def matches(lk: LinkState) -> bool:
        return assignment.source in ("*", lk.source) and assignment.dest in ("*", lk.target)

    if not any(matches(lk) for lk in state.links):
        raise TestbedError(
            f"{assignment.target}: no such link (a pool has no link to itself); "
            f"links: {state._link_names()}"
        )
    links = tuple(dataclasses.replace(lk, **changes) if matches(lk) else lk for lk in state.links)
    return dataclasses.replace(state, links=links)


def apply_assignment(state: SimState, target: str, values: Mapping[str, str]) -> SimState:
    """`node=edge-a-1 cpu=0.9 memory=0.7`, `link=edge-a:cloud bandwidth=5Mbit rtt=40ms`,
    `sim jitter=0.2 seed=7`: the state with those values changed."""
    return apply(state, parse_assignment(target, values))


def set_node_up(state: SimState, name: str, up: bool) -> SimState:
    """A node that is down stops exporting (as a dead node_exporter would)."""
    return apply(state, Assignment("node", f"node={name}", node=name, changes=(("up", up),)))
