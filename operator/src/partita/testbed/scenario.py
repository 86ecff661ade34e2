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

A node may be named by its role in a model's current plan instead of by name, resolved when
the step is played: `plan:first-node` (the first node of the first stage), `plan:last-node`
(the first node of the last stage), `plan:stage-N` (the first node of stage N). The caller
resolves roles (`resolve`); `plan:downed` names the node the last `node_down` step took.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

import yaml

from partita.testbed import simstate
from partita.testbed.errors import TestbedError
from partita.testbed.layout import parse_duration
from partita.testbed.simstate import AssignmentError, SimState

StepKind = Literal["set", "node_down", "node_up"]
ROLE_PREFIX = "plan:"
DOWNED = "plan:downed"
_ROLE = re.compile(r"^plan:(first-node|last-node|stage-[0-9]+|downed)$")
# Resolves a role (e.g. plan:first-node) to a node name when its step is played.
Resolver = Callable[[str], str]
_KINDS: tuple[StepKind, ...] = ("set", "node_down", "node_up")
_TOP_KEYS = {"name", "description", "duration", "steps"}


@dataclass(frozen=True)
class Step:
    index: int  # position in the file, for messages
    at_s: float  # seconds after the scenario starts
    kind: StepKind
    node: str = ""  # for node_down / node_up
    assignment: simstate.Assignment | None = None  # for set

    @property
    def target(self) -> str:
        """The node the step names (a name or a role), "" for a link or sim step."""
        return self.assignment.node if self.assignment is not None else self.node

    def describe(self, node: str | None = None) -> str:
        """The step in words; `node`: the name its role resolved to."""
        shown = self.target if node is None or node == self.target else f"{node} ({self.target})"
        if self.assignment is not None:
            text = self.assignment.describe()
            return f"set {text.replace(self.target, shown, 1) if self.target else text}"
        return f"{self.kind} {shown}"


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

    @property
    def uses_roles(self) -> bool:
        return any(is_role(s.target) for s in self.steps)

    def check(self, state: SimState) -> None:
        """Every node and pool the steps name exists (before any step runs); roles are
        resolved when their step is played."""
        for step in self.steps:
            if is_role(step.target):
                continue
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
    node: str = ""  # the node it acted on, its role resolved


def is_role(name: str) -> bool:
    return name.startswith(ROLE_PREFIX)


def _check_role(name: str, where: str) -> None:
    if is_role(name) and _ROLE.match(name) is None:
        raise TestbedError(
            f"{where}: {name!r} is not a role; roles are plan:first-node, plan:last-node, "
            "plan:stage-N and plan:downed"
        )


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
            raise TestbedError(f"{at}.{kind}: expected a node name or a role (plan:first-node)")
        _check_role(raw[kind], f"{at}.{kind}")
        return Step(i, at_s, kind, node=raw[kind])
    try:
        assignment = simstate.parse_assignment(
            str(raw["set"]), {str(k): v for k, v in rest.items()}
        )
    except AssignmentError as exc:
        key = "set" if exc.key not in rest else exc.key
        raise TestbedError(f"{at}.{key}: {exc.detail}") from None
    _check_role(assignment.node, f"{at}.set")
    return Step(i, at_s, "set", assignment=assignment)


def run(
    scenario: Scenario,
    state_path: Path,
    *,
    clock: Callable[[], float],
    sleep: Callable[[float], None],
    on_node: Callable[[str, bool], None],
    log: Callable[[str], None],
    resolve: Resolver | None = None,
) -> list[PlayedStep]:
    """Play the steps at their times; return what ran when. Names are checked first, so a bad
    scenario changes nothing; a role that cannot be resolved when its step comes stops the
    scenario there, with the step named."""
    scenario.check(simstate.load(state_path))
    if scenario.uses_roles and resolve is None:
        raise TestbedError(
            f"{scenario.source}: the steps name nodes by their role in a plan (plan:...); "
            "give the model whose plan they mean (e.g. --model NAMESPACE/NAME)"
        )
    start = clock()
    played: list[PlayedStep] = []
    downed = ""
    for step in scenario.steps:
        wait = start + step.at_s - clock()
        if wait > 0:
            sleep(wait)
        node = step.target
        if node == DOWNED:
            node = downed
        elif is_role(node):
            assert resolve is not None
            node = resolve(node)
        if not node and step.target:
            raise TestbedError(f"{scenario.source}: steps[{step.index}]: no node for {step.target}")
        if step.assignment is not None:
            assignment = replace(step.assignment, node=node) if step.target else step.assignment
            simstate.update(state_path, partial(simstate.apply, assignment=assignment))
        else:
            is_up = step.kind == "node_up"
            on_node(node, is_up)
            simstate.update(state_path, partial(simstate.set_node_up, name=node, up=is_up))
            if not is_up:
                downed = node
        now = clock() - start
        played.append(PlayedStep(step, step.at_s, now, node))
        log(f"[{now:6.1f}s] {step.describe(node)}")
    rest = start + scenario.duration_s - clock()
    if rest > 0:
        sleep(rest)
    return played
