"""The planner's one error base. Ordinary "no" answers are `Unschedulable`, not errors."""

from __future__ import annotations


class PlannerError(Exception):
    """Invalid planner input: the message names the field or object and what to do."""
