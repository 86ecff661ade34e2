"""A pod process in its own mount namespace, its volumes at their mountPaths, so it runs
unmodified: the ServiceAccount token at /var/run/secrets/kubernetes.io/serviceaccount, a model
store at /var/lib/partita/models, a kubelet-written /etc/hosts.

    python -m partita.testbed.kubelet.sandbox SPEC.json

SPEC.json: {"mounts": [{"target", "source", "read_only"}], "keep": [...], "argv": [...]}. The
launcher unshares its mount namespace (private propagation: nothing leaks back to the host), binds
every source at its target and execs argv with its own environment. A mountPath that does not
exist on this machine is made without touching the host's files: its nearest existing parent
is covered, in this namespace only, by a tmpfs holding binds of that parent's entries plus
the new mount point. Needs root (CAP_SYS_ADMIN); `available()` says whether it works here.
"""

from __future__ import annotations

import ctypes
import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

CLONE_NEWNS = 0x00020000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18


class SandboxError(Exception):
    """The namespace cannot be set up as asked; the message names the mount."""


@dataclass(frozen=True)
class Bind:
    source: str
    target: str
    read_only: bool = False


@dataclass(frozen=True)
class Shadow:
    """Cover `path` with a tmpfs that holds binds of its current entries."""

    path: str


@dataclass(frozen=True)
class Make:
    path: str
    directory: bool


Step = Bind | Shadow | Make


def plan(
    binds: Sequence[Bind],
    exists: Callable[[str], bool] = os.path.lexists,
    is_dir: Callable[[str], bool] = os.path.isdir,
    keep: Sequence[str] = (),
) -> list[Step]:
    """The steps that put every bind in place, parents first (pure, given the host's view).
    Mount points are made only in a tmpfs of ours or inside a pod's own volume.

    `keep` are the image's files on this machine (the venv and the checkout it runs from): a
    container's volumes never hide its image, so a volume mounted over one of them (an
    emptyDir at /tmp while the checkout lives under /tmp) gets it bound back, read-only, at
    its own path (its mount point is made inside that volume)."""
    steps: list[Step] = []
    ours: set[PurePosixPath] = set()  # tmpfs roots and what we made in them
    mounted: list[tuple[PurePosixPath, str]] = []  # bind targets so far, with their sources

    def host_path(p: PurePosixPath) -> str:
        """Where `p` is found now: inside the deepest bind it falls under, else on the host."""
        for target, source in sorted(mounted, key=lambda m: len(m[0].parts), reverse=True):
            if p == target or target in p.parents:
                return str(PurePosixPath(source) / p.relative_to(target))
        return str(p)

    def present(p: PurePosixPath) -> bool:
        return p in ours or exists(host_path(p))

    def writable(p: PurePosixPath) -> bool:
        return p in ours or any(p == t or t in p.parents for t, _ in mounted)

    for bind in sorted(binds, key=lambda b: len(PurePosixPath(b.target).parts)):
        target = PurePosixPath(bind.target)
        if not target.is_absolute():
            raise SandboxError(f"mountPath {bind.target!r} is not absolute")
        if not present(target):
            parent = target.parent
            while not present(parent):
                parent = parent.parent
            if not writable(parent):
                if parent == PurePosixPath("/"):
                    raise SandboxError(
                        f"mountPath {bind.target}: the test bed cannot cover / to make it; "
                        "use a path whose parent directory exists on this machine"
                    )
                steps.append(Shadow(str(parent)))
                ours.add(parent)
            missing = [p for p in [target, *target.parents] if parent in p.parents]
            for p in sorted(missing, key=lambda q: len(q.parts)):
                steps.append(Make(str(p), directory=p != target or is_dir(bind.source)))
                ours.add(p)
        steps.append(Bind(bind.source, str(target), bind.read_only))
        mounted.append((target, bind.source))
    for path in keep:
        kept = PurePosixPath(path)
        if not any(t == kept or t in kept.parents for t, _ in mounted):
            continue
        for p in sorted([kept, *kept.parents], key=lambda q: len(q.parts)):
            if not present(p):
                steps.append(Make(str(p), directory=True))
                ours.add(p)
        steps.append(Bind(path, path, read_only=True))
        mounted.append((kept, path))
    return steps


# ---- carrying the steps out (in the launcher, before exec) ----------------------------------


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise SandboxError(f"{what}: {os.strerror(err)}")


def _mount(
    libc: ctypes.CDLL,
    source: str | None,
    target: str,
    fstype: str | None,
    flags: int,
    data: str | None = None,
) -> None:
    enc = [None if v is None else v.encode() for v in (source, target, fstype, data)]
    _check(libc.mount(enc[0], enc[1], enc[2], ctypes.c_ulong(flags), enc[3]), f"mount {target}")


def execute(steps: Sequence[Step]) -> None:
    """Unshare the mount namespace and carry `steps` out. Every source is opened first, so a
    tmpfs over one of its parents cannot hide it."""
    libc = _libc()
    _check(libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _mount(libc, None, "/", None, MS_REC | MS_PRIVATE)
    handles = {
        s.source: os.open(s.source, os.O_PATH | os.O_CLOEXEC) for s in steps if isinstance(s, Bind)
    }
    for step in steps:
        if isinstance(step, Shadow):
            _shadow(libc, step.path)
        elif isinstance(step, Make):
            if step.directory:
                os.mkdir(step.path, 0o755)
            else:
                os.close(os.open(step.path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))
        else:
            source = f"/proc/self/fd/{handles[step.source]}"
            _mount(libc, source, step.target, None, MS_BIND | MS_REC)
            if step.read_only:
                _mount(libc, None, step.target, None, MS_REMOUNT | MS_BIND | MS_RDONLY)
    for fd in handles.values():
        os.close(fd)


def _shadow(libc: ctypes.CDLL, path: str) -> None:
    fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    old = f"/proc/self/fd/{fd}"
    entries = sorted(os.listdir(old))
    mode = stat.S_IMODE(os.stat(old).st_mode)
    _mount(libc, "tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, f"mode={mode:o}")
    for name in entries:
        src, dest = f"{old}/{name}", os.path.join(path, name)
        st = os.lstat(src)
        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(src), dest)
            continue
        if stat.S_ISDIR(st.st_mode):
            os.mkdir(dest, stat.S_IMODE(st.st_mode))
        else:
            os.close(os.open(dest, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))
        _mount(libc, src, dest, None, MS_BIND | MS_REC)
    os.close(fd)


def spec_binds(doc: dict[str, Any]) -> list[Bind]:
    """The spec's mounts, each target with its symlinks resolved (/var/run -> /run)."""
    return [
        Bind(m["source"], os.path.realpath(m["target"]), bool(m.get("read_only")))
        for m in doc.get("mounts") or []
    ]


def command(spec_file: Path | str) -> list[str]:
    """The command line that runs a pod's process as `spec_file` describes."""
    return [sys.executable, "-m", "partita.testbed.kubelet.sandbox", str(spec_file)]


def available() -> bool:
    """Whether this machine lets the agent give processes their own mount namespace."""
    if os.geteuid() != 0:
        return False
    probe = subprocess.run(
        command("--check"),
        capture_output=True,
        check=False,
        timeout=30,
    )
    return probe.returncode == 0


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args == ["--check"]:
        try:
            execute([])
        except SandboxError as exc:
            print(f"sandbox: {exc}", file=sys.stderr)
            raise SystemExit(1) from None
        return
    if len(args) != 1:
        print("usage: python -m partita.testbed.kubelet.sandbox SPEC.json", file=sys.stderr)
        raise SystemExit(2)
    doc = json.loads(Path(args[0]).read_text())
    try:
        execute(plan(spec_binds(doc), keep=[str(p) for p in doc.get("keep") or []]))
    except (SandboxError, OSError) as exc:
        print(f"sandbox: cannot set up the pod's mounts: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    argv_ = [str(a) for a in doc["argv"]]
    os.execv(argv_[0], argv_)


if __name__ == "__main__":
    main()
