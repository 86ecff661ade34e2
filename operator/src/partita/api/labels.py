"""Label and annotation keys Partita writes or reads, in one place: the operator renders
them, the test bed's kubelet and metrics simulator select by them, tests look them up."""

from __future__ import annotations

PREFIX = "partita.dev"

# On Nodes (set by the cluster's admin, or by the test bed for its kwok nodes).
POOL = f"{PREFIX}/pool"
TIER = f"{PREFIX}/tier"
# Test bed only: how fast a simulated node computes, in cores of the host machine.
SPEED = f"{PREFIX}/speed"

# On the objects of a plan revision (Deployments, Pods, Services, ConfigMaps).
MODEL = f"{PREFIX}/model"
REVISION = f"{PREFIX}/revision"
STAGE = f"{PREFIX}/stage"
SHARD = f"{PREFIX}/shard"
COMPONENT = f"{PREFIX}/component"
ENTRY = f"{PREFIX}/entry"
STAGE_SERVER = "stage-server"  # the value of COMPONENT on every stage server
ENTRY_ROUTER = "entry-router"  # the value of COMPONENT on a model's entry routers

# On a model's entry Service: the pool its requests enter from.
DATA_SOURCE_POOL = f"{PREFIX}/data-source-pool"

MANAGED_BY = "app.kubernetes.io/managed-by"
NAME = "app.kubernetes.io/name"
