"""The metrics reader's one error base.

Only configuration mistakes raise: a Prometheus that is down or a query that fails while
polling is reported in `Observation.problems`, never as an exception.
"""

from __future__ import annotations


class MetricsError(Exception):
    """A bad metrics configuration: the message names the key or file and what to do."""
