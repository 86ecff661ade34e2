"""Model: one EdgeModel's plan and how it performs. Where each stage runs, predicted against
observed latency end to end and per stage, every hop's time and bytes, the share of requests
going past the first stage, request rate and errors, and plan changes as annotations."""

from __future__ import annotations

from grafana_foundation_sdk.builders.dashboard import AnnotationQuery, Dashboard

from .panels import DATASOURCE, RATE, label_variable, new_dashboard, rows, series, single

M = 'namespace="$namespace", model="$model"'
ENTRY = f'{M}, entry="true"'


def _quantile(q: float, metric: str, by: str, where: str) -> str:
    return f"histogram_quantile({q}, sum by (le{by}) (rate({metric}_bucket{{{where}}}[{RATE}])))"


def model() -> Dashboard:
    d = (
        new_dashboard(
            "partita-model",
            "Partita / Model",
            "One EdgeModel: its current plan, predicted against observed latency end to end "
            "and per stage, hops, cascade offload, requests and errors, plan changes.",
        )
        .with_variable(label_variable("namespace", "Namespace", "partita_model_phase"))
        .with_variable(
            label_variable("model", "Model", 'partita_model_phase{namespace="$namespace"}')
        )
        .annotation(
            AnnotationQuery()
            .name("Plan changes")
            .datasource(DATASOURCE)
            .enable(True)
            .icon_color("orange")
            .expr(f"increase(partita_reschedules_total{{{M}}}[{RATE}]) > 0")
        )
    )
    d = d.with_panel(
        single(
            "Phase",
            "The model's phase now; `kubectl partita status` says why.",
            "none",
            (
                f"max by (phase) (last_over_time(partita_model_phase{{{M}}}[{RATE}])) == 1",
                "{{phase}}",
            ),
        )
    )
    d = d.with_panel(
        single(
            "Serving revision",
            "The plan revision serving traffic; every plan change is a new revision.",
            "none",
            (f"max(last_over_time(partita_plan_revision{{{M}}}[{RATE}]))", "revision"),
        )
    )
    d = d.with_panel(
        single(
            "Predicted p95",
            "End-to-end latency the planner predicts for the serving plan.",
            "s",
            (
                f"max(last_over_time(partita_model_predicted_latency_seconds{{{M}}}[{RATE}]))",
                "predicted",
            ),
        )
    )
    d = d.with_panel(
        single(
            "Observed p95",
            "95th percentile end-to-end latency of answered requests at the model's entry.",
            "s",
            (_quantile(0.95, "partita_request_seconds", "", f'{ENTRY}, code="200"'), "observed"),
        )
    )
    d = d.with_panel(
        rows(
            "Current plan",
            "Every server of the serving plan: its stage, shard, pool and node.",
            "none",
            (
                "max by (revision, stage, shard, pool, node) "
                f"(last_over_time(partita_plan_stage_info{{{M}}}[{RATE}])) "
                f"and on (revision) max by (revision) (partita_plan_stage_info{{{M}}})",
                "",
            ),
        )
    )
    d = d.with_panel(
        series(
            "End-to-end latency: predicted and observed",
            "The planner's prediction for the serving plan beside the p50 and p95 measured at "
            "the entry (answered requests, the whole chain), and the SLO of spec.slo.",
            "s",
            (
                f"max(last_over_time(partita_model_predicted_latency_seconds{{{M}}}[{RATE}]))",
                "predicted",
            ),
            (_quantile(0.5, "partita_request_seconds", "", f'{ENTRY}, code="200"'), "observed p50"),
            (
                _quantile(0.95, "partita_request_seconds", "", f'{ENTRY}, code="200"'),
                "observed p95",
            ),
            (f"max(last_over_time(partita_model_slo_seconds{{{M}}}[{RATE}]))", "SLO p95"),
            width=24,
        )
    )
    d = d.with_panel(
        series(
            "Stage compute: predicted and observed",
            "Compute time per request of each stage: the planner's prediction (slowest server "
            "of the stage) beside the p50 and p95 onnxruntime time its servers measure.",
            "s",
            (
                "max by (stage) "
                f"(last_over_time(partita_stage_predicted_compute_seconds{{{M}}}[{RATE}]))",
                "predicted stage {{stage}}",
            ),
            (
                _quantile(0.5, "partita_compute_seconds", ", stage", M),
                "observed p50 stage {{stage}}",
            ),
            (
                _quantile(0.95, "partita_compute_seconds", ", stage", M),
                "observed p95 stage {{stage}}",
            ),
        )
    )
    d = d.with_panel(
        series(
            "Stage latency (stage and the rest of the chain)",
            "p95 of answered requests at each stage server, the stages after it included: the "
            "difference between two stages is what the later part of the chain costs.",
            "s",
            (
                _quantile(0.95, "partita_request_seconds", ", stage", f'{M}, code="200"'),
                "p95 at stage {{stage}}",
            ),
        )
    )
    d = d.with_panel(
        series(
            "Hop time: predicted and observed",
            "Time to bring a stage its inputs: the planner's prediction per stage (stage 0: from "
            "the data source) beside the network time of each hop its servers measure (round "
            "trip minus the next server's own time).",
            "s",
            (
                "max by (stage) "
                f"(last_over_time(partita_stage_predicted_transfer_seconds{{{M}}}[{RATE}]))",
                "predicted into stage {{stage}}",
            ),
            (
                f"sum by (stage, next_stage) (rate(partita_hop_seconds_sum{{{M}}}[{RATE}])) "
                f"/ sum by (stage, next_stage) (rate(partita_hop_seconds_count{{{M}}}[{RATE}]))",
                "observed {{stage}} → {{next_stage}}",
            ),
        )
    )
    d = d.with_panel(
        series(
            "Hop bytes per request",
            "Bytes a stage sends to the next one per request (the cut's tensors, after "
            "compression).",
            "bytes",
            (
                f"sum by (stage, next_stage) (rate(partita_hop_bytes_total{{{M}}}[{RATE}])) "
                f"/ sum by (stage, next_stage) (rate(partita_hop_seconds_count{{{M}}}[{RATE}]))",
                "{{stage}} → {{next_stage}}",
            ),
        )
    )
    d = d.with_panel(
        series(
            "Requests past the first stage (cascade offload)",
            "Share of the requests entering the model that reach its second stage. With "
            "spec.cascade, the offload ratio (the rest were answered confidently at the "
            "first stage); without one, 1 for a plan of two stages or more.",
            "percentunit",
            (
                # Two counters scraped at different moments can put the ratio a little over 1.
                "clamp_max(max(sum by (shard) (rate(partita_requests_total"
                f'{{{M}, stage="1"}}[{RATE}]))) / max(sum by (shard, stage) '
                f"(rate(partita_requests_total{{{ENTRY}}}[{RATE}]))), 1)",
                "past the first stage",
            ),
        )
    )
    d = d.with_panel(
        series(
            "Requests and errors",
            "Requests per second at the model's entry, by HTTP status (200: answered; "
            "4xx: bad input, named in the error body; 5xx: a stage failed).",
            "reqps",
            (f"sum by (code) (rate(partita_requests_total{{{ENTRY}}}[{RATE}]))", "{{code}}"),
        )
    )
    d = d.with_panel(
        series(
            "Node speed the planner uses",
            "GFLOP/s of each node of the plan for this model: declared, profiled, or learned "
            "from the compute times its servers reported.",
            "gflops",
            (
                f"max by (node, source) (last_over_time(partita_node_speed_gflops{{{M}}}[{RATE}]))",
                "{{node}} ({{source}})",
            ),
        )
    )
    d = d.with_panel(
        series(
            "Planning time",
            "Time of one control-loop step of this model (planning and rescheduling), p95.",
            "s",
            (_quantile(0.95, "partita_planning_seconds", "", M), "p95"),
        )
    )
    return d
