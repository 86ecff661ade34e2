"""Local cluster benchmark: warm `testbed up` / `down` time and the memory of its processes.

Run: `.venv/bin/python bench/testbed.py` (or `make bench`); needs `make install` first.
Writes bench/results/testbed.json and testbed.md. The cold build (Go modules + compile) is
not re-run here: it takes 10-15 minutes and `make install` prints its duration.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

from partita.testbed import cluster
from partita.testbed.layout import parse_nodes

RESULTS = Path(__file__).resolve().parent / "results"
LAYOUT = "edge-a=2,edge-b=2,cloud=2"


def main(runs: int = 3) -> None:
    ups, downs, rss = [], [], []
    for i in range(runs):
        with tempfile.TemporaryDirectory(prefix="partita-bench-") as tmp:
            run_dir = Path(tmp)
            start = time.monotonic()
            cluster.up(run_dir, parse_nodes(LAYOUT), log=lambda m: None)
            ups.append(time.monotonic() - start)
            time.sleep(5)  # let every component settle before measuring memory
            rss.append(cluster.rss_by_process(run_dir))
            start = time.monotonic()
            cluster.down(run_dir)
            downs.append(time.monotonic() - start)
            print(
                f"run {i + 1}/{runs}: up {ups[-1]:.1f} s, down {downs[-1]:.1f} s, "
                f"RSS {sum(rss[-1].values()) / 2**20:.0f} MiB",
                flush=True,
            )
    per_process = {k: statistics.median(r[k] for r in rss) for k in rss[-1]}
    total = statistics.median(sum(r.values()) for r in rss)
    result = {
        "layout": LAYOUT,
        "runs": runs,
        "warm_up_s": {"median": statistics.median(ups), "all": ups},
        "down_s": {"median": statistics.median(downs), "all": downs},
        "rss_bytes": {"total_median": total, "per_process_median": per_process},
        "aims": {"warm_up_s": 20, "rss_total_bytes": 1.5 * 2**30},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "testbed.json").write_text(json.dumps(result, indent=2))
    lines = [
        "# Local cluster",
        "",
        f"Layout `{LAYOUT}`, {runs} runs, warm binaries.",
        "",
        f"- warm `up` (processes started, nodes Ready, Prometheus ready, agent up): "
        f"median {result['warm_up_s']['median']:.1f} s (aim <= 20 s)",
        f"- `down`: median {result['down_s']['median']:.1f} s",
        f"- RSS of all processes: median {total / 2**20:.0f} MiB (aim <= 1536 MiB)",
        "",
        "| process | RSS (MiB) |",
        "|---|---|",
        *(f"| {k} | {v / 2**20:.0f} |" for k, v in sorted(per_process.items())),
    ]
    (RESULTS / "testbed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
