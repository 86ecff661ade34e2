"""Fleet: every model at a glance. Which are Ready, which moved and why, which fail requests,
whether the operator still gets fresh metrics and how long planning takes."""

from __future__ import annotations

from grafana_foundation_sdk.builders.dashboard import Dashboard

from .panels import RATE, boolean, label_variable, new_dashboard, series, single

NS = 'namespace=~"$namespace"'
ENTRY = f'{NS}, entry="true"'


def fleet() -> Dashboard:
    d = new_dashboard(
        "partita-fleet",
        "Partita / Fleet",
        "Every EdgeModel: phase, plan changes and their reasons, failed requests, metrics "
        "freshness and planning time.",
    ).with_variable(label_variable("namespace", "Namespace", "partita_model_phase", multi=True))
    d = d.with_panel(
        single(
            "Models by phase",
            "How many EdgeModels are in each phase now (Ready, Deploying, Unschedulable, "
            "Failed...). Unschedulable and Failed models say why in `kubectl partita status`.",
            "none",
            (f"sum by (phase) (last_over_time(partita_model_phase{{{NS}}}[{RATE}]))", "{{phase}}"),
            width=12,
            height=6,
        )
    )
    d = d.with_panel(
        single(
            "Operator metrics fresh",
            "Whether the operator plans on current Prometheus data (condition MetricsFresh). "
            "Stale: plans are kept and nothing moves on metrics until fresh data returns.",
            "none",
            (f"max(last_over_time(partita_metrics_fresh[{RATE}]))", "fresh"),
            width=6,
            height=6,
            mappings=boolean("stale", "fresh"),
        )
    )
    d = d.with_panel(
        single(
            "Age of the last metrics poll",
            "Seconds since the operator last read Prometheus; it polls every "
            "prometheus.pollInterval seconds.",
            "s",
            (
                "time() - max(last_over_time("
                f"partita_metrics_last_poll_timestamp_seconds[{RATE}]))",
                "age",
            ),
            width=6,
            height=6,
        )
    )
    d = d.with_panel(
        series(
            "Plan revision per model",
            "The revision serving each model; a step up is a new plan taking the traffic.",
            "none",
            (
                "max by (namespace, model) "
                f"(last_over_time(partita_plan_revision{{{NS}}}[{RATE}]))",
                "{{namespace}}/{{model}}",
            ),
        )
    )
    d = d.with_panel(
        series(
            "Reschedules by reason",
            "Plan changes of serving models in each interval, by why: NodeLost, NoLongerFits, "
            "SpecChanged, SloMissed, Improvement (a plan better by minImprovement), Preempted "
            "(made room for a higher priority).",
            "short",
            (
                f"sum by (reason) (increase(partita_reschedules_total{{{NS}}}[{RATE}]))",
                "{{reason}}",
            ),
        )
    )
    d = d.with_panel(
        series(
            "Failed requests per model",
            "Requests per second a model's entry answered with an error (any status but 2xx); "
            "0 when every request succeeded.",
            "reqps",
            (
                f'sum by (namespace, model) (rate(partita_requests_total{{{ENTRY}, code!~"2.."}}'
                f"[{RATE}])) or sum by (namespace, model) "
                f"(rate(partita_requests_total{{{ENTRY}}}[{RATE}])) * 0",
                "{{namespace}}/{{model}}",
            ),
        )
    )
    d = d.with_panel(
        series(
            "Requests per model",
            "Requests per second arriving at each model's entry.",
            "reqps",
            (
                f"sum by (namespace, model) (rate(partita_requests_total{{{ENTRY}}}[{RATE}]))",
                "{{namespace}}/{{model}}",
            ),
        )
    )
    d = d.with_panel(
        series(
            "Observed p95 latency per model",
            "95th percentile of answered requests at each model's entry, the whole chain "
            "of stages included.",
            "s",
            (
                "histogram_quantile(0.95, sum by (le, namespace, model) "
                f'(rate(partita_request_seconds_bucket{{{ENTRY}, code="200"}}[{RATE}])))',
                "{{namespace}}/{{model}}",
            ),
        )
    )
    d = d.with_panel(
        series(
            "Planning time",
            "Time of one control-loop step of a model (planning, rescheduling decision), p50 "
            "and p95 over all models.",
            "s",
            (
                "histogram_quantile(0.5, sum by (le) "
                f"(rate(partita_planning_seconds_bucket{{{NS}}}[{RATE}])))",
                "p50",
            ),
            (
                "histogram_quantile(0.95, sum by (le) "
                f"(rate(partita_planning_seconds_bucket{{{NS}}}[{RATE}])))",
                "p95",
            ),
        )
    )
    d = d.with_panel(
        series(
            "Reconciles and errors",
            "Reconciles per second by kind and controller (profile: fetch and analyse a model; "
            "placement: a step of the loop; pool: count a DevicePool's nodes), and errors "
            "by reason (0 when there are none).",
            "ops",
            (
                f"sum by (kind, controller) (rate(partita_reconciles_total[{RATE}]))",
                "{{kind}} {{controller}}",
            ),
            (
                f"sum by (kind, controller, reason) (rate(partita_reconcile_errors_total[{RATE}]))"
                f" or sum by (kind, controller) (rate(partita_reconciles_total[{RATE}])) * 0",
                "errors {{kind}} {{controller}} {{reason}}",
            ),
            width=24,
        )
    )
    return d
