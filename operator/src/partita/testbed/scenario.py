"""Scenarios: timed changes to the simulated cluster, played from a YAML file.

    name: demo
    duration: 60s            # optional: keep running until then after the last step
    steps:
      - {at: 10s, set: "link=edge-a:cloud", bandwidth: 2Mbit}
      - {at: 30s, set: "node=edge-a-1", cpu: 0.95}
      - {at: 40s, node_down: edge-a-2}
      - {at: 55s, node_up: edge-a-2}

`set` steps use the grammar of `partita testbed set`. `node_down`/`node_up` go to a callback
(the caller talks to the apiserver) and also silence/restore the node's exporters, as a dead
node's would be. Clock and sleep are injected, so tests play a scenario without waiting.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import yaml

from partita.testbed import simstate
from partita.testbed.errors import TestbedError
from partita.testbed.layout import parse_duration
from partita.testbed.simstate import AssignmentError, SimState

StepKind = Literal["set", "node_down", "node_up"]
_KINDS: tuple[StepKind, ...] = ("set", "node_down", "node_up")
_TOP_KEYS = {"name", "description", "duration", "steps"}


@dataclass(frozen=True)
class Step:
    index: int  # position in the file, for messages
    at_s: float  # seconds after the scenario starts
    kind: StepKind
    node: str = ""  # for node_down / node_up
    assignment: simstate.Assignment | None = None  # for set

    def describe(self) -> str:
        if self.assignment is not None:
            return f"set {self.assignment.describe()}"
        return f"{self.kind} {self.node}"


@dataclass(frozen=True)
class Scenario:
    steps: tuple[Step, ...]  # ordered by time
    name: str = ""
    duration_s: float = 0.0
    source: str = field(default="<scenario>", compare=False)

    @classmethod
    def load(cls, path: Path) -> Scenario:
        try:
            doc = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise TestbedError(f"{path}: cannot read the scenario: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise TestbedError(f"{path}: not valid YAML: {exc}") from None
        return cls.parse(doc, str(path))

    @classmethod
    def parse(cls, doc: Any, where: str = "<scenario>") -> Scenario:
        if not isinstance(doc, dict) or not isinstance(doc.get("steps"), list):
            raise TestbedError(f"{where}: expected a mapping with a 'steps' list")
        extra = sorted(set(doc) - _TOP_KEYS)
        if extra:
            raise TestbedError(
                f"{where}: unknown key(s) {', '.join(map(str, extra))}; "
                f"allowed: {', '.join(sorted(_TOP_KEYS))}"
            )
        steps = [_parse_step(i, raw, where) for i, raw in enumerate(doc["steps"])]
        if not steps:
            raise TestbedError(f"{where}: 'steps' is empty")
        dur = 0.0
        if doc.get("duration") is not None:
            dur = _seconds(doc["duration"], f"{where}: duration")
        steps.sort(key=lambda s: s.at_s)  # stable: same `at` keeps file order
        return cls(tuple(steps), str(doc.get("name") or ""), dur, where)

    def check(self, state: SimState) -> None:
        """Every node and pool the steps name exists (before any step runs)."""
        for step in self.steps:
            try:
                if step.assignment is not None:
                    simstate.apply(state, step.assignment)
                else:
                    state.node(step.node)
            except TestbedError as exc:
                raise TestbedError(f"{self.source}: steps[{step.index}]: {exc}") from None


@dataclass(frozen=True)
class PlayedStep:
    step: Step
    planned_s: float
    actual_s: float  # when it was applied, seconds after the start


def _seconds(raw: object, where: str) -> float:
    try:
        value = float(raw) if isinstance(raw, int | float) else parse_duration(str(raw))
    except (TypeError, ValueError):
        raise TestbedError(f"{where}: {raw!r} is not a time (e.g. 10s, 500ms, 2.5)") from None
    if value < 0:
        raise TestbedError(f"{where}: {raw!r} is negative")
    return value


def _parse_step(i: int, raw: object, where: str) -> Step:
    at = f"{where}: steps[{i}]"
    if not isinstance(raw, dict):
        raise TestbedError(f"{at}: expected a mapping like {{at: 10s, set: link=edge-a:cloud}}")
    if "at" not in raw:
        raise TestbedError(f"{at}: needs 'at' (seconds after the start, e.g. 10s)")
    at_s = _seconds(raw["at"], f"{at}.at")
    kinds = [k for k in _KINDS if k in raw]
    if len(kinds) != 1:
        raise TestbedError(f"{at}: needs exactly one of {', '.join(_KINDS)}")
    kind = kinds[0]
    rest: Mapping[str, object] = {k: v for k, v in raw.items() if k not in ("at", kind)}
    if kind != "set":
        if rest:
            raise TestbedError(f"{at}.{next(iter(rest))}: unknown key for a {kind} step")
        if not isinstance(raw[kind], str) or not raw[kind]:
            raise TestbedError(f"{at}.{kind}: expected a node name")
        return Step(i, at_s, kind, node=raw[kind])
    try:
        assignment = simstate.parse_assignment(
            str(raw["set"]), {str(k): v for k, v in rest.items()}
        )
    except AssignmentError as exc:
        key = "set" if exc.key not in rest else exc.key
        raise TestbedError(f"{at}.{key}: {exc.detail}") from None
    return Step(i, at_s, "set", assignment=assignment)


def run(
    scenario: Scenario,
    state_path: Path,
    *,
    clock: Callable[[], float],
    sleep: Callable[[float], None],
    on_node: Callable[[str, bool], None],
    log: Callable[[str], None],
) -> list[PlayedStep]:
    """Play the steps at their times; return what ran when. Names are checked first, so a bad
    scenario changes nothing."""
    scenario.check(simstate.load(state_path))
    start = clock()
    played: list[PlayedStep] = []
    for step in scenario.steps:
        wait = start + step.at_s - clock()
        if wait > 0:
            sleep(wait)
        if step.assignment is not None:
            simstate.update(state_path, partial(simstate.apply, assignment=step.assignment))
        else:
            is_up = step.kind == "node_up"
            on_node(step.node, is_up)
            simstate.update(state_path, partial(simstate.set_node_up, name=step.node, up=is_up))
        now = clock() - start
        played.append(PlayedStep(step, step.at_s, now))
        log(f"[{now:6.1f}s] {step.describe()}")
    rest = start + scenario.duration_s - clock()
    if rest > 0:
        sleep(rest)
    return played
