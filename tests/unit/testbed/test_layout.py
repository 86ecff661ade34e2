"""The local cluster's node layout: pod CIDRs for a fleet, a clear refusal past it, links."""

from __future__ import annotations

import ipaddress

import pytest

from partita.testbed.errors import TestbedError
from partita.testbed.layout import MAX_NODES, POD_CIDR, parse_nodes, pod_cidr, with_link


def test_a_thousand_nodes_get_disjoint_pod_cidrs_inside_the_cluster_block() -> None:
    layout = parse_nodes("edge=900,cloud=100")
    cidrs = [ipaddress.ip_network(pod_cidr(i)) for i in range(len(layout.nodes))]
    block = ipaddress.ip_network(POD_CIDR)
    assert all(c.subnet_of(block) and c.prefixlen == 24 for c in cidrs)
    assert len({c.network_address for c in cidrs}) == 1000
    # 10.244.257.0/24 is no address: a /16 of /24s stops at 256 nodes.
    assert pod_cidr(257) == "10.245.1.0/24"


def test_more_nodes_than_the_block_holds_are_refused_before_anything_starts() -> None:
    with pytest.raises(TestbedError, match=f"at most {MAX_NODES}"):
        parse_nodes(f"edge={MAX_NODES},cloud=1")


def test_with_link_sets_both_directions_of_one_link_and_leaves_the_others() -> None:
    layout = parse_nodes("edge-a=1,edge-b=1,cloud=1")
    fast = with_link(layout, "edge-a", "cloud", 1e9, 0.002)
    by_ends = {(lk.source, lk.target): (lk.bandwidth_bps, lk.rtt_s) for lk in fast.links}
    assert by_ends[("edge-a", "cloud")] == by_ends[("cloud", "edge-a")] == (1e9, 0.002)
    before = {(lk.source, lk.target): (lk.bandwidth_bps, lk.rtt_s) for lk in layout.links}
    others = {k for k in by_ends if "edge-a" not in k or "cloud" not in k}
    assert others and all(by_ends[k] == before[k] for k in others)
    assert fast.nodes == layout.nodes
