"""kind-config.yaml as kind itself reads it: decoded strictly with kind's v1alpha4 types
(testbed/kindcheck, a Go program on the sigs.k8s.io/kind module), and its workers carry the
labels the example DevicePools select."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
CHECKER = ROOT / "testbed" / "kindcheck"


def kindcheck(config: Path) -> subprocess.CompletedProcess[str]:
    go = shutil.which("go")
    assert go is not None, "Go is part of the machine: it builds the local cluster too"
    return subprocess.run(
        [go, "run", ".", str(config)],
        cwd=CHECKER,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_kind_config_decodes_strictly_and_labels_the_pools_workers() -> None:
    done = kindcheck(ROOT / "kind-config.yaml")
    assert done.returncode == 0, done.stderr
    workers = []
    for line in done.stdout.splitlines():
        _index, role, *rest = line.split(" ")
        labels = dict(kv.split("=", 1) for kv in rest[0].split(",")) if rest and rest[0] else {}
        if role == "worker":
            workers.append(labels)
    assert workers, done.stdout
    pools = [d for d in yaml.safe_load_all((ROOT / "examples/devicepools.yaml").read_text()) if d]
    for pool in pools:
        selector = pool["spec"]["nodeSelector"]
        members = [w for w in workers if all(w.get(k) == v for k, v in selector.items())]
        assert members, f"no kind worker carries {selector} (DevicePool {pool['metadata']['name']})"
        assert all(w["partita.dev/tier"] == pool["spec"]["tier"] for w in members)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("nodes:\n  - role: worker\n    lables: {a: b}\n", 'unknown field "lables"'),
        ("nodes:\n  - role: worker\n    labels: [a]\n", "cannot unmarshal array"),
    ],
)
def test_what_kind_would_refuse_is_refused(tmp_path: Path, text: str, error: str) -> None:
    config = tmp_path / "kind.yaml"
    config.write_text("kind: Cluster\napiVersion: kind.x-k8s.io/v1alpha4\n" + text)
    done = kindcheck(config)
    assert done.returncode == 1 and error in done.stderr, done.stderr
