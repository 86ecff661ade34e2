"""`make bench`: every benchmark in turn, each writing bench/results/<name>.json and .md.

Each runs in its own process (a crash or a missing optional dependency in one does not
stop the others); the exit code is non-zero when any failed.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = ("model", "planner", "server", "testbed", "loop", "shard_calls", "horizontal")


def main() -> int:
    failed = []
    for i, name in enumerate(BENCHES, 1):
        script = HERE / f"{name}.py"
        if not script.exists():
            continue
        print(f"==> bench {i}/{len(BENCHES)}: {name}", flush=True)
        start = time.monotonic()
        code = subprocess.call([sys.executable, str(script)])
        print(f"    {name}: exit {code} after {time.monotonic() - start:.0f} s", flush=True)
        if code != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
