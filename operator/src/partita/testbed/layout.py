"""The simulated nodes and links of the local cluster, as frozen data."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from partita.testbed.errors import TestbedError

GIB = 1024**3

# Default capacity per tier (issue: edge 4 CPU / 4 GiB, cloud 32 CPU / 128 GiB).
TIER_DEFAULTS: dict[str, tuple[int, int]] = {"edge": (4, 4 * GIB), "cloud": (32, 128 * GIB)}
# How fast one core of a node computes relative to one core of this machine: an edge board
# is four times slower (the agent enforces it with a CPU quota on the stage processes).
TIER_SPEED: dict[str, float] = {"edge": 0.25, "cloud": 1.0}


# Every node's pods get a /24 of this block (as kube-controller-manager's --cluster-cidr with
# --node-cidr-mask-size=24 would give them): 1,024 nodes at most.
POD_CIDR = "10.244.0.0/14"
NODE_CIDR_PREFIX = 24
MAX_NODES = 2 ** (NODE_CIDR_PREFIX - ipaddress.ip_network(POD_CIDR).prefixlen)


def pod_cidr(index: int) -> str:
    """The podCIDR of the `index`-th node (from 0)."""
    if not 0 <= index < MAX_NODES:
        raise TestbedError(f"node index {index}: the local cluster holds {MAX_NODES} nodes")
    block = ipaddress.ip_network(POD_CIDR)
    return str(ipaddress.ip_network((int(block.network_address) + (index << 8), NODE_CIDR_PREFIX)))


@dataclass(frozen=True)
class NodeSpec:
    name: str
    pool: str
    tier: str  # "edge" | "cloud"
    zone: str
    cpu: int
    memory_bytes: int
    # How fast this node computes relative to one core of this machine (1.0 = same).
    speed: float = 1.0


@dataclass(frozen=True)
class LinkSpec:
    """A network path between two pools, as the simulator reports it (and the agent shapes it)."""

    source: str  # pool name
    target: str  # pool name
    bandwidth_bps: float
    rtt_s: float


@dataclass(frozen=True)
class Layout:
    nodes: tuple[NodeSpec, ...]
    links: tuple[LinkSpec, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if len(self.nodes) > MAX_NODES:
            raise TestbedError(
                f"{len(self.nodes)} nodes asked for: the local cluster holds at most {MAX_NODES}"
                f" (one /{NODE_CIDR_PREFIX} of {POD_CIDR} for each node's pods)"
            )

    def node(self, name: str) -> NodeSpec:
        for n in self.nodes:
            if n.name == name:
                return n
        known = ", ".join(n.name for n in self.nodes)
        raise TestbedError(f"unknown node {name!r}; the local cluster has: {known}")

    @property
    def pools(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(n.pool for n in self.nodes))


_NODES_RE = re.compile(r"^([a-z][a-z0-9-]*)=(\d+)$")


def parse_nodes(text: str) -> Layout:
    """`edge=4,cloud=2` -> one pool per tier; `edge-a=2,edge-b=2,cloud=2` -> pools named so, tier
    from the name's first word (edge|cloud)."""
    nodes: list[NodeSpec] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = _NODES_RE.match(part)
        if not m:
            raise TestbedError(f"--nodes: {part!r} is not POOL=COUNT (example: edge=4,cloud=2)")
        pool, count = m.group(1), int(m.group(2))
        tier = pool.split("-")[0]
        if tier not in TIER_DEFAULTS:
            raise TestbedError(f"--nodes: pool {pool!r} must start with 'edge' or 'cloud'")
        cpu, mem = TIER_DEFAULTS[tier]
        for i in range(1, count + 1):
            nodes.append(
                NodeSpec(f"{pool}-{i}", pool, tier, f"zone-{pool}", cpu, mem, TIER_SPEED[tier])
            )
    if not nodes:
        raise TestbedError("--nodes: no nodes given (example: edge=4,cloud=2)")
    return Layout(tuple(nodes), default_links(nodes))


def default_links(nodes: list[NodeSpec]) -> tuple[LinkSpec, ...]:
    """Every ordered pair of pools: 1 Gbit/s, 1 ms inside a tier; 100 Mbit/s, 20 ms across."""
    tiers = {n.pool: n.tier for n in nodes}
    links = []
    for a, ta in tiers.items():
        for b, tb in tiers.items():
            if a == b:
                continue
            same = ta == tb
            links.append(LinkSpec(a, b, 1e9 if same else 100e6, 0.001 if same else 0.020))
    return tuple(links)


def with_link(layout: Layout, a: str, b: str, bandwidth_bps: float, rtt_s: float) -> Layout:
    """`layout` with both directions of the link between pools `a` and `b` set as given."""
    ends = {(a, b), (b, a)}
    links = tuple(
        LinkSpec(lk.source, lk.target, bandwidth_bps, rtt_s)
        if (lk.source, lk.target) in ends
        else lk
        for lk in layout.links
    )
    return Layout(layout.nodes, links)


def load_layout(path: Path) -> Layout:
    """A YAML file: `pools: [{name, tier, nodes, cpu?, memory?, speed?, zone?}]`, `links: [{source,
    target, bandwidth: 100Mbit, rtt: 20ms}]` (links not given default as in `default_links`)."""
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise TestbedError(f"{path}: cannot read the cluster layout: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("pools"), list):
        raise TestbedError(f"{path}: expected a mapping with a 'pools' list")
    nodes: list[NodeSpec] = []
    for i, p in enumerate(doc["pools"]):
        where = f"{path}: pools[{i}]"
        if not isinstance(p, dict) or "name" not in p:
            raise TestbedError(f"{where}: needs a 'name'")
        tier = p.get("tier", str(p["name"]).split("-")[0])
        if tier not in TIER_DEFAULTS:
            raise TestbedError(f"{where}.tier: {tier!r} is not edge or cloud")
        cpu, mem = TIER_DEFAULTS[tier]
        try:
            count = int(p.get("nodes", 1))
            cpu = int(p.get("cpu", cpu))
            mem = parse_bytes(p["memory"]) if "memory" in p else mem
            speed = float(p.get("speed", TIER_SPEED[tier]))
        except (TypeError, ValueError) as exc:
            raise TestbedError(f"{where}: {exc}") from exc
        for k in range(1, count + 1):
            nodes.append(
                NodeSpec(
                    f"{p['name']}-{k}",
                    p["name"],
                    tier,
                    p.get("zone", f"zone-{p['name']}"),
                    cpu,
                    mem,
                    speed,
                )
            )
    given = {}
    for i, link in enumerate(doc.get("links") or []):
        where = f"{path}: links[{i}]"
        try:
            spec = LinkSpec(
                link["source"],
                link["target"],
                parse_rate(link["bandwidth"]),
                parse_duration(link["rtt"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise TestbedError(
                f"{where}: needs source, target, bandwidth (e.g. 100Mbit), rtt (e.g. 20ms): {exc}"
            ) from exc
        given[(spec.source, spec.target)] = spec
    links = tuple(given.get((d.source, d.target), d) for d in default_links(nodes))
    return Layout(tuple(nodes), links)


_RATE = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "bps": 1}
_DURATION = {"s": 1.0, "ms": 1e-3, "us": 1e-6}
_BYTES = {"": 1, "ki": 1024, "mi": 1024**2, "gi": 1024**3, "k": 1e3, "m": 1e6, "g": 1e9}


def _number_unit(text: str) -> tuple[float, str]:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z/]*)\s*", str(text))
    if not m:
        raise ValueError(f"{text!r} is not a number with a unit")
    return float(m.group(1)), m.group(2).lower()


def parse_rate(text: str | float) -> float:
    """'5Mbit' -> 5e6 bit/s."""
    value, unit = _number_unit(str(text))
    unit = unit.removesuffix("/s").removesuffix("ps") if unit not in _RATE else unit
    if unit not in _RATE:
        raise ValueError(f"{text!r}: unit must be one of bit, Kbit, Mbit, Gbit")
    return value * _RATE[unit]


def parse_duration(text: str | float) -> float:
    """'40ms' -> 0.04 s."""
    value, unit = _number_unit(str(text))
    if unit not in _DURATION:
        raise ValueError(f"{text!r}: unit must be one of s, ms, us")
    return value * _DURATION[unit]


def parse_bytes(text: str | int) -> int:
    """'4Gi' -> 4294967296."""
    value, unit = _number_unit(str(text))
    if unit not in _BYTES:
        raise ValueError(f"{text!r}: unit must be one of Ki, Mi, Gi, K, M, G")
    return int(value * _BYTES[unit])
