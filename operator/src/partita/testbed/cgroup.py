"""CPU quotas that make a simulated node compute as fast as its pool declares.

A node's `partita.dev/speed` annotation says how fast one of its cores is relative to one core
of this machine; the agent puts each stage process of that node in a cgroup whose CFS quota is
that fraction of a core (capped by the container's cpu limit, and shrunk when the simulator says
a noisy neighbour leaves less than one core free). cgroup v1 (`cpu` controller) and v2
(`cpu.max`) are both supported; without either the processes run unthrottled, with one warning.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# Short, so a slow node throttles one request evenly rather than in 100 ms lumps.
PERIOD_US = 20_000
MIN_QUOTA_US = 1_000  # the kernel refuses less
V1_ROOT = Path("/sys/fs/cgroup/cpu")
V2_ROOTS = (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup"))


def quota_cores(
    speed: float,
    limit_cores: float | None = None,
    node_cpus: int = 1,
    node_utilisation: float = 0.0,
) -> float:
    """Cores of this machine the pod may use: `speed` for one core of the node, times the share
    of a node core a noisy neighbour leaves free (all of it while a whole core is free), capped
    by the container's limit (in node cores, so also scaled by `speed`)."""
    free_node_cores = max(0.0, node_cpus * (1.0 - node_utilisation))
    cores = speed * min(1.0, free_node_cores)
    if limit_cores is not None:
        cores = min(cores, speed * limit_cores)
    return max(cores, MIN_QUOTA_US / PERIOD_US)


def quota_us(cores: float, period_us: int = PERIOD_US) -> int:
    return max(MIN_QUOTA_US, round(cores * period_us))


@dataclass(frozen=True)
class CgroupBackend:
    """Where pod cgroups go: v1 writes cpu.cfs_quota_us, v2 writes cpu.max."""

    version: int  # 1 | 2
    parent: Path

    def set_quota(self, group: Path, quota: int, period: int = PERIOD_US) -> None:
        if self.version == 1:
            (group / "cpu.cfs_period_us").write_text(str(period))
            (group / "cpu.cfs_quota_us").write_text(str(quota))
        else:
            (group / "cpu.max").write_text(f"{quota} {period}")


def _v1(root: Path, name: str) -> CgroupBackend | None:
    if not (root / "cpu.cfs_quota_us").exists():
        return None
    parent = root / name
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return CgroupBackend(1, parent) if os.access(parent, os.W_OK) else None


def _v2(root: Path, name: str) -> CgroupBackend | None:
    try:
        controllers = (root / "cgroup.controllers").read_text().split()
    except OSError:
        return None
    if "cpu" not in controllers:
        return None
    parent = root / name
    try:
        with contextlib.suppress(OSError):  # already enabled, or inherited
            (root / "cgroup.subtree_control").write_text("+cpu")
        parent.mkdir(parents=True, exist_ok=True)
        (parent / "cgroup.subtree_control").write_text("+cpu")
    except OSError:
        return None
    return CgroupBackend(2, parent)


def detect(
    run_dir: Path, v1_root: Path = V1_ROOT, v2_roots: tuple[Path, ...] = V2_ROOTS
) -> CgroupBackend | None:
    """A writable cpu cgroup hierarchy, with a parent group private to this run directory."""
    name = "partita-testbed-" + hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:10]
    found = _v1(v1_root, name)
    for root in v2_roots:
        if found is None:
            found = _v2(root, name)
    return found


class CpuLimiter:
    """One cgroup per pod under the run's parent group; every call degrades to a no-op (after
    one warning) when no cpu cgroup hierarchy is writable."""

    def __init__(self, backend: CgroupBackend | None) -> None:
        self.backend = backend
        if backend is None:
            log.warning(
                "no writable cpu cgroup (v1 %s or v2 with the cpu controller): stage processes "
                "run at full speed, so simulated node speeds are not enforced",
                V1_ROOT,
            )

    def _group(self, pod_uid: str) -> Path | None:
        return None if self.backend is None else self.backend.parent / f"pod-{pod_uid}"

    def place(self, pod_uid: str, pid: int, cores: float) -> bool:
        """Limit `pid` (and the threads it starts later) to `cores`; False when not enforced."""
        group = self._group(pod_uid)
        if group is None or self.backend is None:
            return False
        try:
            group.mkdir(exist_ok=True)
            self.backend.set_quota(group, quota_us(cores))
            (group / "cgroup.procs").write_text(str(pid))
        except OSError as exc:
            log.warning("cannot limit pod %s to %.2f cores: %s", pod_uid, cores, exc)
            return False
        return True

    def update(self, pod_uid: str, cores: float) -> None:
        group = self._group(pod_uid)
        if group is None or self.backend is None or not group.is_dir():
            return
        try:
            self.backend.set_quota(group, quota_us(cores))
        except OSError as exc:
            log.warning("cannot change pod %s's cpu quota: %s", pod_uid, exc)

    def remove(self, pod_uid: str) -> None:
        group = self._group(pod_uid)
        if group is not None:
            with contextlib.suppress(OSError):
                group.rmdir()

    def close(self) -> None:
        if self.backend is not None:
            for group in self.backend.parent.glob("pod-*"):
                with contextlib.suppress(OSError):
                    group.rmdir()
            with contextlib.suppress(OSError):
                self.backend.parent.rmdir()
