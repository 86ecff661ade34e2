"""Pools and links: how busy each node is, how fast the links between pools are (as the
exporters measure them and as Partita estimates them) and which stages run where."""

from __future__ import annotations

from grafana_foundation_sdk.builders.dashboard import Dashboard

from .panels import RATE, boolean, label_variable, new_dashboard, rows, series

POOL = 'pool=~"$pool"'
# Joins a per-node series to its pool (the operator's partita_node_info), keeping $pool only.
IN_POOL = f" * on (node) group_left (pool) max by (node, pool) (partita_node_info{{{POOL}}})"
LINK = 'source_pool=~"$pool"'


def pools() -> Dashboard:
    d = new_dashboard(
        "partita-pools",
        "Partita / Pools and links",
        "Node CPU and memory by pool, link bandwidth and RTT as measured and as Partita "
        "estimates them, and where each stage runs.",
    ).with_variable(label_variable("pool", "Pool", "partita_node_info", multi=True))
    d = d.with_panel(
        series(
            "Node CPU busy",
            "Share of each node's CPU not idle (node_exporter), by pool. The planner leaves "
            "busy nodes' capacity to what already runs there.",
            "percentunit",
            (
                f'(1 - sum by (node) (rate(node_cpu_seconds_total{{mode="idle"}}[{RATE}])) '
                f"/ sum by (node) (rate(node_cpu_seconds_total[{RATE}]))){IN_POOL}",
                "{{pool}} {{node}}",
            ),
        )
    )
    d = d.with_panel(
        series(
            "Node memory available",
            "Memory available on each node (node_exporter), by pool; a stage needs its "
            "weights and activations to fit.",
            "bytes",
            (
                f"max by (node) (last_over_time(node_memory_MemAvailable_bytes[{RATE}])){IN_POOL}",
                "{{pool}} {{node}}",
            ),
        )
    )
    d = d.with_panel(
        series(
            "Link bandwidth: measured and estimated",
            "Bandwidth between pools as iperf3_exporter measures it, and what the planner "
            "uses (measured, or the DevicePool's declared uplink when nothing is measured).",
            "bps",
            (
                "avg by (source_pool, target_pool) "
                f"(8 * last_over_time(iperf3_received_bytes{{{LINK}}}[{RATE}]) "
                f"/ last_over_time(iperf3_received_seconds{{{LINK}}}[{RATE}]))",
                "measured {{source_pool}} → {{target_pool}}",
            ),
            (
                "max by (source_pool, target_pool, source) "
                f"(last_over_time(partita_link_bandwidth_estimate_bps{{{LINK}}}[{RATE}]))",
                "Partita ({{source}}) {{source_pool}} → {{target_pool}}",
            ),
        )
    )
    d = d.with_panel(
        series(
            "Link RTT: measured and estimated",
            "Round-trip time between pools as blackbox_exporter's ICMP probe measures it, and "
            "what the planner uses.",
            "s",
            (
                "avg by (source_pool, target_pool) (last_over_time("
                f'probe_icmp_duration_seconds{{phase="rtt", {LINK}}}[{RATE}]))',
                "measured {{source_pool}} → {{target_pool}}",
            ),
            (
                "max by (source_pool, target_pool, source) "
                f"(last_over_time(partita_link_rtt_estimate_seconds{{{LINK}}}[{RATE}]))",
                "Partita ({{source}}) {{source_pool}} → {{target_pool}}",
            ),
        )
    )
    d = d.with_panel(
        series(
            "Stage servers per node",
            "How many stage servers of serving plans each node runs, by pool.",
            "none",
            (
                "count by (pool, node) "
                f"(last_over_time(partita_plan_stage_info{{{POOL}}}[{RATE}]))",
                "{{pool}} {{node}}",
            ),
        )
    )
    d = d.with_panel(
        series(
            "Node speed the planner uses",
            "GFLOP/s per node for each model, and where it comes from: declared (DevicePool), "
            "profiled, or learned from the compute times the node's servers reported.",
            "gflops",
            (
                "max by (namespace, model, node, source) "
                f"(last_over_time(partita_node_speed_gflops[{RATE}])){IN_POOL}",
                "{{node}} {{namespace}}/{{model}} ({{source}})",
            ),
        )
    )
    d = d.with_panel(
        series(
            "Node ready",
            "1 while the planner sees the node Ready; a node of a plan that goes NotReady moves "
            "its stages at once.",
            "none",
            (
                f"max by (node) (last_over_time(partita_node_ready[{RATE}])){IN_POOL}",
                "{{pool}} {{node}}",
            ),
        ).mappings(boolean("not ready", "ready"))
    )
    d = d.with_panel(
        rows(
            "Stage placement",
            "Every stage server of every serving plan: the pool and node it runs on.",
            "none",
            (
                "max by (pool, node, namespace, model, revision, stage, shard) "
                f"(last_over_time(partita_plan_stage_info{{{POOL}}}[{RATE}]))",
                "",
            ),
            width=12,
        )
    )
    return d
