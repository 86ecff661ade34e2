"""Build and locate the local cluster's binaries, cached by version under ~/.cache/partita/bin.

etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl and kwok are one
multi-call Go binary (`testbed/go` in the repository: Kubernetes, etcd and kwok pinned in its
go.mod), so the thousands of packages they share compile once. helm is `go install`ed at a
pinned version. Prometheus and promtool come from Debian (`make install` installs them).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from partita.testbed.errors import TestbedError

KUBE_VERSION = "v1.36.3"
HELM_VERSION = "v3.22.0"
KUBE_COMPONENTS = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
    "kwok",
)
# kwok's node lifecycle stages, copied at install time from the kwok module the binary is
# built from. kwok plays the nodes only: every pod on them is run by the test bed's kubelet.
KWOK_STAGES = (
    "kustomize/stage/node/fast/node-initialize.yaml",
    "kustomize/stage/node/heartbeat-with-lease/node-heartbeat-with-lease.yaml",
    "kustomize/stage/node/chaos/node-not-ready.yaml",
)

Log = Callable[[str], None]


def cache_dir() -> Path:
    return Path(os.environ.get("PARTITA_CACHE", Path.home() / ".cache" / "partita"))


def bin_dir() -> Path:
    """Stable directory of symlinks to the current binaries (put it on PATH)."""
    return cache_dir() / "bin"


def go_module_dir() -> Path:
    env = os.environ.get("PARTITA_TESTBED_GO")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[4] / "testbed" / "go"


@dataclass(frozen=True)
class Binaries:
    kube: Path  # the multi-call binary
    helm: Path
    prometheus: Path
    promtool: Path
    kwok_stages: Path

    def component(self, name: str) -> list[str]:
        return [str(self.kube), name]


def _ldflags() -> str:
    major, minor = KUBE_VERSION.lstrip("v").split(".")[:2]
    pkg = "k8s.io/component-base/version"
    return " ".join(
        [
            "-s -w",
            f"-X {pkg}.gitVersion={KUBE_VERSION}",
            f"-X {pkg}.gitMajor={major}",
            f"-X {pkg}.gitMinor={minor}",
            f"-X {pkg}.gitTreeState=clean",
        ]
    )


_STAGES_REVISION = "1"  # bump when what _copy_kwok_stages writes changes
_HELM_BUILD_REVISION = "release-flags"  # change when helm_ldflags changes


def _kube_key(src: Path) -> str:
    digest = hashlib.sha256((_ldflags() + _STAGES_REVISION).encode())
    for name in ("go.mod", "go.sum", "main.go"):
        digest.update((src / name).read_bytes())
    return digest.hexdigest()[:12]


def kube_bundle_dir() -> Path:
    src = go_module_dir()
    if not (src / "go.mod").exists():
        raise TestbedError(f"the testbed Go module is missing at {src} (set PARTITA_TESTBED_GO)")
    return cache_dir() / "build" / f"kube-{KUBE_VERSION}-{_kube_key(src)}"


def locate() -> Binaries:
    """The installed binaries, or a TestbedError saying how to install them."""
    bundle = kube_bundle_dir()
    kube = bundle / "partita-kube"
    helm = helm_dir() / "helm"
    missing = [str(p) for p in (kube, helm) if not p.exists()]
    prometheus, promtool = shutil.which("prometheus"), shutil.which("promtool")
    if not prometheus:
        missing.append("prometheus (Debian package 'prometheus')")
    if not promtool:
        missing.append("promtool (Debian package 'prometheus')")
    if missing:
        raise TestbedError(
            "missing binaries: " + ", ".join(missing) + ". Run `make install` "
            "(or `partita testbed install`) first."
        )
    assert prometheus and promtool
    return Binaries(kube, helm, Path(prometheus), Path(promtool), bundle / "kwok-stages")


def _go() -> str:
    go = shutil.which("go")
    if not go:
        raise TestbedError("`go` is not on PATH: the local cluster's binaries are built with Go")
    return go


def _run_with_progress(cmd: list[str], cwd: Path, total: int, label: str, log: Log) -> None:
    """Run `go build -v`/`go install -v` and report how many packages compiled so far."""
    env = {**os.environ, "CGO_ENABLED": "0"}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    done, last, errors = 0, 0.0, []
    for raw in proc.stderr:
        line = raw.rstrip()
        if re.match(r"^[\w.\-]+(/[\w.\-~]+)*$", line):
            done += 1
            now = time.monotonic()
            if now - last > 10:
                log(f"  [{label}] compiled {done}/{total or '?'} packages ({line})")
                last = now
        else:
            errors.append(line)
    if proc.wait() != 0:
        tail = "\n".join(errors[-30:])
        raise TestbedError(f"building {label} failed:\n{tail}")


def _count_packages(cwd: Path, target: str) -> int:
    out = subprocess.run(
        [_go(), "list", "-deps", "-f", "{{if not .Standard}}{{.ImportPath}}{{end}}", target],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "CGO_ENABLED": "0"},
    )
    return len([x for x in out.stdout.splitlines() if x]) if out.returncode == 0 else 0


def install(log: Log = print, force: bool = False) -> Binaries:
    """Build what is missing; fast (a few stat calls) when everything is cached."""
    src = go_module_dir()
    bundle = kube_bundle_dir()
    kube = bundle / "partita-kube"
    if force or not kube.exists():
        started = time.monotonic()
        log(
            f"==> building Kubernetes {KUBE_VERSION} components (etcd, kube-apiserver, "
            "kube-controller-manager, kube-scheduler, kubectl, kwok) as one binary; "
            "cold: about 8-10 min on 2 cores, cached afterwards in " + str(bundle)
        )
        log("  resolving Go modules (downloads on a cold cache)...")
        total = _count_packages(src, ".")
        tmp = bundle.with_name(bundle.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _run_with_progress(
            [
                _go(),
                "build",
                "-v",
                "-trimpath",
                "-ldflags",
                _ldflags(),
                "-o",
                str(tmp / "partita-kube"),
                ".",
            ],
            src,
            total,
            "kubernetes",
            log,
        )
        _copy_kwok_stages(src, tmp / "kwok-stages")
        shutil.rmtree(bundle, ignore_errors=True)
        tmp.rename(bundle)
        log(f"  built in {time.monotonic() - started:.0f} s")
    helm = helm_dir()
    if force or not (helm / "helm").exists():
        started = time.monotonic()
        log(f"==> building helm {HELM_VERSION} (cold: about 2-5 min)")
        tmp = helm.with_name(helm.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        env_cmd = [
            _go(),
            "install",
            "-v",
            "-trimpath",
            "-ldflags",
            helm_ldflags(_helm_go_mod(tmp)),
            f"helm.sh/helm/v3/cmd/helm@{HELM_VERSION}",
        ]
        os.environ["GOBIN"] = str(tmp)
        try:
            _run_with_progress(env_cmd, tmp, 0, "helm", log)
        finally:
            os.environ.pop("GOBIN", None)
        shutil.rmtree(helm, ignore_errors=True)
        tmp.rename(helm)
        log(f"  built in {time.monotonic() - started:.0f} s")
    _link(bundle, helm)
    return locate()


def helm_dir() -> Path:
    return cache_dir() / "build" / f"helm-{HELM_VERSION}-{_HELM_BUILD_REVISION}"


def helm_ldflags(go_mod: str) -> str:
    """What helm's own Makefile stamps into a release build: the helm version, and the
    Kubernetes version `helm template` and `helm lint` assume (client-go's v0.N.P read as
    v1.N, as the Makefile's K8S_MODULES_MAJOR_VER/MINOR_VER do). Without them helm says
    Kubernetes v1.20.0, and a chart's kubeVersion constraint fails offline."""
    m = re.search(r"^\s*k8s\.io/client-go\s+v(\d+)\.(\d+)\.\d+", go_mod, re.MULTILINE)
    if m is None:
        raise TestbedError(f"helm {HELM_VERSION}'s go.mod names no k8s.io/client-go version")
    major, minor = int(m.group(1)) + 1, int(m.group(2))
    version = "helm.sh/helm/v3/internal/version"
    flags = [
        "-w -s",
        f"-X {version}.version={HELM_VERSION}",
        f"-X {version}.metadata=",
        f"-X {version}.gitTreeState=clean",
    ]
    for pkg in ("helm.sh/helm/v3/pkg/lint/rules", "helm.sh/helm/v3/pkg/chartutil"):
        flags += [f"-X {pkg}.k8sVersionMajor={major}", f"-X {pkg}.k8sVersionMinor={minor}"]
    return " ".join(flags)


def _helm_go_mod(cwd: Path) -> str:
    out = subprocess.run(
        [_go(), "mod", "download", "-json", f"helm.sh/helm/v3@{HELM_VERSION}"],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        return Path(json.loads(out.stdout)["GoMod"]).read_text()
    except (ValueError, KeyError, OSError):
        raise TestbedError(f"cannot download helm {HELM_VERSION}: {out.stderr.strip()}") from None


def _copy_kwok_stages(src: Path, dest: Path) -> None:
    out = subprocess.run(
        [_go(), "list", "-m", "-f", "{{.Dir}}", "sigs.k8s.io/kwok"],
        cwd=src,
        capture_output=True,
        text=True,
        check=False,
    )
    kwok_dir = Path(out.stdout.strip())
    if out.returncode != 0 or not kwok_dir.is_dir():
        raise TestbedError(f"cannot find the kwok module's stages: {out.stderr.strip()}")
    dest.mkdir(parents=True, exist_ok=True)
    for rel in KWOK_STAGES:
        shutil.copyfile(kwok_dir / rel, dest / Path(rel).name)


def kwok_node_stages(directory: Path) -> str:
    """kwok's configuration: the copied stages that act on Nodes (a bundle built before kwok
    left pods alone also holds pod stages; they are skipped)."""
    docs = [yaml.safe_load(p.read_text()) for p in sorted(directory.glob("*.yaml"))]
    nodes = [d for d in docs if d["spec"]["resourceRef"]["kind"] == "Node"]
    return "\n---\n".join(yaml.safe_dump(d, sort_keys=False) for d in nodes)


def _link(bundle: Path, helm: Path) -> None:
    """Symlinks in bin_dir(): one per component of the multi-call binary, plus helm."""
    target = bin_dir()
    target.mkdir(parents=True, exist_ok=True)
    for name in KUBE_COMPONENTS:
        _symlink(target / name, bundle / "partita-kube")
    _symlink(target / "helm", helm / "helm")


def _symlink(link: Path, dest: Path) -> None:
    if link.is_symlink() or link.exists():
        if link.is_symlink() and os.readlink(link) == str(dest):
            return
        link.unlink()
    link.symlink_to(dest)


def main() -> None:  # pragma: no cover - thin CLI entry
    try:
        install()
    except TestbedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
