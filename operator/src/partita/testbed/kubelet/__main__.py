"""`python -m partita.testbed.kubelet --run-dir DIR`: the agent of one local cluster, until
SIGTERM or SIGINT (then every process it started is stopped)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from partita.testbed.errors import TestbedError
from partita.testbed.kubelet import agent


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m partita.testbed.kubelet",
        description="Run every pod scheduled on the local cluster's simulated nodes as a "
        "local process, and route Service traffic between them.",
    )
    parser.add_argument("--run-dir", type=Path, required=True, help="the local cluster's run dir")
    parser.add_argument("--log-level", default="INFO")
    ns = parser.parse_args(argv)
    logging.basicConfig(
        level=ns.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per probe otherwise
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        agent.run(ns.run_dir.resolve(), stop)
    except TestbedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
