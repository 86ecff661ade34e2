"""The chart installed on the local cluster as a user installs it: `helm upgrade --install`
with a model store (a PersistentVolumeClaim bound to a hostPath volume holding .onnx files),
and the operator pod it creates, which the test bed's kubelet runs as a local process.

The demo, the e2e suite and the benches all install Partita this way, so what they exercise is
the chart's operator under the chart's ServiceAccount.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from partita.testbed import binaries
from partita.testbed.errors import TestbedError

CHART = Path(__file__).resolve().parents[4] / "charts" / "partita"
STORE_CLAIM = "models"


@dataclass(frozen=True)
class Release:
    kubeconfig: Path
    namespace: str = "partita-system"
    name: str = "partita"

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "PATH": f"{binaries.bin_dir()}:{os.environ['PATH']}",
        }

    def _run(self, tool: str, *args: str, input: str | None = None, check: bool = True,
             timeout: float = 300) -> subprocess.CompletedProcess[str]:  # fmt: skip
        exe = str(binaries.locate().helm) if tool == "helm" else str(binaries.bin_dir() / tool)
        done = subprocess.run(
            [exe, *args],
            env=self.env(),
            input=input,
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
        )
        if check and done.returncode != 0:
            raise TestbedError(f"{tool} {' '.join(args[:3])}: {done.stderr.strip()[-800:]}")
        return done

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> str:
        return self._run("kubectl", *args, input=input, check=check).stdout

    def install(
        self,
        values: Mapping[str, str] | None = None,
        *,
        model_store: Path | None = None,
        wait_s: int = 180,
    ) -> None:
        """Install (or upgrade) the chart; with `model_store`, its .onnx files are the chart's
        model store (file:///var/lib/partita/models/NAME in an EdgeModel)."""
        self.kubectl("create", "namespace", self.namespace, check=False)
        settings = dict(values or {})
        if model_store is not None:
            self._store(model_store)
            settings["modelStore.existingClaim"] = STORE_CLAIM
        args = [f"--set={k}={v}" for k, v in settings.items()]
        self._run(
            "helm", "upgrade", "--install", self.name, str(CHART), "-n", self.namespace,
            *args, "--wait", "--timeout", f"{wait_s}s", timeout=wait_s + 60,
        )  # fmt: skip

    def upgrade(self, values: Mapping[str, Any], *, wait_s: int = 180) -> None:
        """`helm upgrade --reuse-values` setting each of `values` (a value of the chart's
        values.yaml by its dotted path) to the JSON of the given object."""
        args = [f"--set-json={k}={json.dumps(v)}" for k, v in values.items()]
        self._run(
            "helm", "upgrade", self.name, str(CHART), "-n", self.namespace, "--reuse-values",
            *args, "--wait", "--timeout", f"{wait_s}s", timeout=wait_s + 60,
        )  # fmt: skip

    def uninstall(self) -> None:
        self._run("helm", "uninstall", self.name, "-n", self.namespace, "--wait", check=False)
        self.kubectl("delete", "pvc", STORE_CLAIM, "-n", self.namespace, check=False)
        self.kubectl("delete", "pv", "-l", self._store_label, "--wait=false", check=False)

    def operator_pod(self) -> dict[str, Any] | None:
        """The operator pod that is Ready now, None while there is none."""
        listed = self.kubectl(
            "get", "pods", "-n", self.namespace, "-l",
            f"app.kubernetes.io/instance={self.name}", "-o", "json",
        )  # fmt: skip
        for pod in json.loads(listed)["items"]:
            if pod["metadata"].get("deletionTimestamp"):
                continue
            if any(
                c["type"] == "Ready" and c["status"] == "True"
                for c in (pod.get("status") or {}).get("conditions", [])
            ):
                return dict(pod)
        return None

    def logs(self) -> str:
        """The operator's log: the test bed's kubelet writes each pod's output to
        logs/pod-NAMESPACE-NAME.log in the run directory (the one holding the kubeconfig);
        it serves no `kubectl logs`. Every pod of the release, oldest first."""
        files = sorted(
            (self.kubeconfig.parent / "logs").glob(f"pod-{self.namespace}-{self.name}-*.log"),
            key=lambda p: p.stat().st_mtime,
        )
        return "".join(f"==> {f.name}\n{f.read_text(errors='replace')}" for f in files)

    def _volume(self, directory: Path) -> str:
        """The model store's volume: named after the directory it holds, so a release
        installed again over another directory never meets the old one still being deleted."""
        tag = hashlib.sha256(str(directory).encode()).hexdigest()[:8]
        return f"{self.namespace}-{STORE_CLAIM}-{tag}"

    @property
    def _store_label(self) -> str:
        return f"partita.dev/model-store={self.namespace}.{self.name}"

    def _store(self, directory: Path) -> None:
        directory = directory.resolve()
        key, value = self._store_label.split("=")
        docs = [
            {
                "apiVersion": "v1",
                "kind": "PersistentVolume",
                "metadata": {"name": self._volume(directory), "labels": {key: value}},
                "spec": {
                    "capacity": {"storage": "10Gi"},
                    "accessModes": ["ReadOnlyMany"],
                    "storageClassName": "",
                    "hostPath": {"path": str(directory), "type": "Directory"},
                    "claimRef": {"namespace": self.namespace, "name": STORE_CLAIM},
                },
            },
            {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": {"name": STORE_CLAIM, "namespace": self.namespace},
                "spec": {
                    "accessModes": ["ReadOnlyMany"],
                    "storageClassName": "",
                    "volumeName": self._volume(directory),
                    "resources": {"requests": {"storage": "10Gi"}},
                },
            },
        ]
        self.kubectl("apply", "-f", "-", input="\n---\n".join(json.dumps(d) for d in docs))


def container_pid(pod: Mapping[str, Any]) -> int:
    """The host pid of the pod's process (the test bed's kubelet writes it as the container ID)."""
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    if not statuses or "containerID" not in statuses[0]:
        raise TestbedError(f"pod {pod['metadata']['name']} runs no process yet")
    return int(str(statuses[0]["containerID"]).rsplit("/", 1)[1])
