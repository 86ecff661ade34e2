"""An EdgeModel's status as the CLI reads it: fetched from the API server and parsed by the API
models, so every command (the demo, `partita testbed scenario --model`) reads the same fields
the operator writes."""

from __future__ import annotations

from pathlib import Path

from partita.api.edgemodel import EdgeModel, EdgeModelStatus
from partita.api.meta import GROUP, VERSION


class StatusError(Exception):
    """The status cannot be read or does not say what was asked; the message says why."""


def fetch_model(kubeconfig: Path | None, namespace: str, name: str) -> EdgeModel | None:
    """The EdgeModel, or None while it does not exist."""
    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException

    api = config.new_client_from_config(config_file=str(kubeconfig) if kubeconfig else None)
    try:
        body = client.CustomObjectsApi(api).get_namespaced_custom_object(
            GROUP, VERSION, namespace, "edgemodels", name
        )
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise StatusError(f"EdgeModel {namespace}/{name}: {exc.status} {exc.reason}") from None
    finally:
        api.close()
    return EdgeModel.parse(body)


def node_for_role(status: EdgeModelStatus | None, role: str) -> str:
    """The node a scenario role names in the serving plan: plan:first-node, plan:last-node,
    plan:stage-N (the first node of that stage)."""
    plan = status.plan if status is not None else None
    if plan is None or not plan.stages:
        raise StatusError(f"{role}: the model has no serving plan yet")
    which = role.removeprefix("plan:")
    if which == "first-node":
        stage = plan.stages[0]
    elif which == "last-node":
        stage = plan.stages[-1]
    elif which.startswith("stage-") and which[6:].isdigit():
        index = int(which[6:])
        if index >= len(plan.stages):
            raise StatusError(f"{role}: the plan has {len(plan.stages)} stages")
        stage = plan.stages[index]
    else:
        raise StatusError(f"{role}: not a role of a plan")
    nodes = [s.node for s in stage.shards] or stage.nodes
    if not nodes:
        raise StatusError(f"{role}: stage {stage.index} lists no node")
    return nodes[0]
