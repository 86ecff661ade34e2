"""How a pod's mount namespace is laid out: binds parents first, missing mount points made in
a tmpfs of the namespace or inside the pod's own volume, never on the host."""

from __future__ import annotations

import pytest

from partita.testbed.kubelet.sandbox import Bind, Make, SandboxError, Shadow, plan

HOST = {"/", "/etc", "/etc/hosts", "/run", "/var", "/var/cache", "/var/cache/partita", "/tmp"}
HOST |= {"/pods/p/cache", "/pods/p/sa", "/pods/p/hosts", "/pods/p/stage"}


def _plan(*binds: Bind) -> list[object]:
    return list(plan(binds, exists=HOST.__contains__, is_dir=lambda p: not p.endswith("hosts")))


def test_existing_mount_points_are_bound_as_they_are() -> None:
    steps = _plan(
        Bind("/pods/p/hosts", "/etc/hosts", read_only=True),
        Bind("/pods/p/cache", "/var/cache/partita"),
    )
    assert steps == [
        Bind("/pods/p/hosts", "/etc/hosts", read_only=True),
        Bind("/pods/p/cache", "/var/cache/partita"),
    ]


def test_a_missing_mount_point_is_made_in_a_tmpfs_over_its_parent() -> None:
    steps = _plan(Bind("/pods/p/sa", "/run/secrets/kubernetes.io/serviceaccount", read_only=True))
    assert steps == [
        Shadow("/run"),
        Make("/run/secrets", directory=True),
        Make("/run/secrets/kubernetes.io", directory=True),
        Make("/run/secrets/kubernetes.io/serviceaccount", directory=True),
        Bind("/pods/p/sa", "/run/secrets/kubernetes.io/serviceaccount", read_only=True),
    ]


def test_one_shadow_serves_every_mount_under_it_and_parents_go_first() -> None:
    steps = _plan(
        Bind("/pods/p/hosts", "/etc/hosts"),
        Bind("/pods/p/stage", "/etc/partita"),
        Bind("/pods/p/cache", "/etc/partita/cache"),
        Bind("/pods/p/sa", "/etc/other"),
    )
    assert steps == [
        Bind("/pods/p/hosts", "/etc/hosts"),
        Shadow("/etc"),
        Make("/etc/partita", directory=True),
        Bind("/pods/p/stage", "/etc/partita"),
        Make("/etc/other", directory=True),
        Bind("/pods/p/sa", "/etc/other"),
        # inside the pod's own volume: made there, as a container runtime does
        Make("/etc/partita/cache", directory=True),
        Bind("/pods/p/cache", "/etc/partita/cache"),
    ]


def test_a_file_mount_point_is_a_file() -> None:
    steps = _plan(Bind("/pods/p/hosts", "/var/lib/hosts"))
    assert steps == [
        Shadow("/var"),
        Make("/var/lib", directory=True),
        Make("/var/lib/hosts", directory=False),
        Bind("/pods/p/hosts", "/var/lib/hosts"),
    ]


def test_the_root_is_never_covered() -> None:
    with pytest.raises(SandboxError, match="cannot cover /"):
        _plan(Bind("/pods/p/cache", "/models"))
    with pytest.raises(SandboxError, match="not absolute"):
        _plan(Bind("/pods/p/cache", "models"))


def test_a_volume_over_the_image_files_gets_them_bound_back() -> None:
    # The checkout (the image's files) lives under /tmp; the pod mounts an emptyDir at /tmp.
    host = HOST | {"/tmp/checkout", "/pods/p/tmp"}
    steps = plan(
        [Bind("/pods/p/tmp", "/tmp")],
        exists=host.__contains__,
        is_dir=lambda p: True,
        keep=["/tmp/checkout", "/usr"],
    )
    assert steps == [
        Bind("/pods/p/tmp", "/tmp"),
        Make("/tmp/checkout", directory=True),  # inside the pod's own volume
        Bind("/tmp/checkout", "/tmp/checkout", read_only=True),
    ]  # /usr is under no volume: nothing to do
