"""Start and stop the local cluster's processes: each in its own process group, with a pid
file and a log file, so `down` can stop everything even from another shell."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from partita.testbed.errors import TestbedError


@dataclass(frozen=True)
class Process:
    name: str
    pid: int
    log: Path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def check_port_free(port: int, what: str, host: str = "127.0.0.1") -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            raise TestbedError(
                f"port {port} for {what} is already taken ({exc.strerror}); "
                "choose another or let the test bed pick a free one"
            ) from None


def start(
    name: str,
    argv: list[str],
    run_dir: Path,
    env: dict[str, str] | None = None,
    *,
    inherit_env: bool = True,
) -> Process:
    """Start `argv` in a new session, output to logs/<name>.log, pid in pids/<name>.pid. The
    environment is ours plus `env`, or `env` alone without `inherit_env` (a pod's process
    sees only what its spec and image give it)."""
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{name}.log"
    with log.open("ab") as out:
        try:
            proc = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=run_dir,
                env={**(os.environ if inherit_env else {}), **(env or {})},
            )
        except OSError as exc:
            raise TestbedError(f"cannot start {name} ({argv[0]}): {exc.strerror}") from None
    (run_dir / "pids").mkdir(exist_ok=True)
    (run_dir / "pids" / f"{name}.pid").write_text(str(proc.pid))
    _children[proc.pid] = proc
    return Process(name, proc.pid, log)


# The Popen objects of the processes this process started. Dropping one lets the subprocess
# module reap that child on the next Popen() and throw its exit status away; kept here, the
# status stays readable through `exit_code`.
_children: dict[int, subprocess.Popen[bytes]] = {}


def exit_code(pid: int) -> int | None:
    """A child's exit code (128 + signal when killed), None while it runs or if unknown."""
    proc = _children.get(pid)
    if proc is None:
        return None
    code = proc.poll()
    if code is None:
        return None
    return 128 - code if code < 0 else code


def alive(pid: int) -> bool:
    proc = _children.get(pid)
    if proc is not None:
        return proc.poll() is None
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie that is not our child still answers kill(0); check its state.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def ensure_running(proc: Process) -> None:
    if not alive(proc.pid):
        tail = "\n".join(proc.log.read_text(errors="replace").splitlines()[-15:])
        raise TestbedError(f"{proc.name} exited during start-up; last lines of {proc.log}:\n{tail}")


def signal_group(pid: int, sig: int) -> None:
    """Send `sig` to the process group `pid` leads; gone already is fine."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def stop_one(
    pid: int,
    grace: float = 10.0,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """SIGTERM one process group, SIGKILL it after `grace` seconds; returns once it is gone
    (or 5 s after the SIGKILL). Both waits run on `clock` and `sleep`."""
    signal_group(pid, signal.SIGTERM)
    deadline = clock() + grace
    while alive(pid) and clock() < deadline:
        sleep(0.05)
    signal_group(pid, signal.SIGKILL)
    deadline = clock() + 5.0
    while alive(pid) and clock() < deadline:
        sleep(0.05)


def stop_all(run_dir: Path, grace: float = 10.0) -> list[str]:
    """Stop every recorded process group, newest first, each before the next: the apiserver
    shuts down cleanly only while etcd still answers (all at once, it waits out the grace)."""
    pid_dir = run_dir / "pids"
    if not pid_dir.is_dir():
        return []
    entries = [(f, int(f.read_text().strip() or 0)) for f in pid_dir.glob("*.pid")]
    entries.sort(key=lambda e: e[0].stat().st_mtime)  # start order
    stopped = []
    for path, pid in reversed(entries):
        if pid > 0 and alive(pid):
            stop_one(pid, grace)
            stopped.append(path.stem)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if pid > 0:
                os.killpg(pid, signal.SIGKILL)  # stray children of the group
        path.unlink(missing_ok=True)
    return stopped


def rss_bytes(pid: int) -> int:
    """Resident memory of a process and its descendants (from /proc)."""
    total = 0
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
        todo.extend(children.get(p, []))
    return total
