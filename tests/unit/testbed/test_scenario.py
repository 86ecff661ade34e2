"""Scenario files: parsing, errors that point at the step, and timing on a fake clock."""

from __future__ import annotations

from pathlib import Path

import pytest

from partita.testbed import simstate
from partita.testbed.errors import TestbedError
from partita.testbed.layout import parse_nodes
from partita.testbed.scenario import Scenario, run
from partita.testbed.simstate import SimState

EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "scenarios"


class FakeTime:
    """A clock that only moves when the scenario sleeps."""

    def __init__(self) -> None:
        self.now = 50.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def state_file(tmp_path: Path) -> Path:
    path = tmp_path / "state.json"
    simstate.save(path, SimState.from_layout(parse_nodes("edge-a=2,edge-b=2,cloud=2")))
    return path


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "scenario.yaml"
    path.write_text(text)
    return path


def test_steps_are_played_at_their_times(state_file: Path, tmp_path: Path) -> None:
    sc = Scenario.load(
        write(
            tmp_path,
            """
name: t
duration: 60s
steps:
  - {at: 30s, set: "node=edge-a-1", cpu: 0.95}
  - {at: 10s, set: "link=edge-a:cloud", bandwidth: 2Mbit, rtt: 80ms}
  - {at: 40s, node_down: edge-a-2}
  - {at: 45, node_up: edge-a-2}
""",
        )
    )
    t = FakeTime()
    calls: list[tuple[str, bool, float]] = []
    states: list[SimState] = []

    def on_node(name: str, up: bool) -> None:
        calls.append((name, up, t.now - 50.0))
        states.append(simstate.load(state_file))

    lines: list[str] = []
    played = run(sc, state_file, clock=t.clock, sleep=t.sleep, on_node=on_node, log=lines.append)
    assert [(p.planned_s, p.actual_s) for p in played] == [(10, 10), (30, 30), (40, 40), (45, 45)]
    assert calls == [("edge-a-2", False, 40.0), ("edge-a-2", True, 45.0)]
    assert sum(t.sleeps) == 60.0  # waits out `duration` after the last step
    final = simstate.load(state_file)
    assert final.link("edge-a", "cloud").bandwidth_bps == 2e6
    assert final.link("edge-a", "cloud").rtt_s == pytest.approx(0.08)
    assert final.node("edge-a-1").cpu_utilisation == 0.95
    assert final.node("edge-a-2").up
    # When edge-a-2 went down, the earlier steps had already been applied.
    assert states[0].link("edge-a", "cloud").bandwidth_bps == 2e6
    assert len(lines) == 4 and "node_down edge-a-2" in lines[2]


def test_a_late_start_does_not_sleep_backwards(state_file: Path) -> None:
    sc = Scenario.parse({"steps": [{"at": "1s", "set": "node=cloud-1", "cpu": "0.5"}]})
    t = FakeTime()

    def slow_clock() -> float:
        t.now += 5.0  # every look at the clock costs 5 s
        return t.now

    run(sc, state_file, clock=slow_clock, sleep=t.sleep, on_node=lambda n, u: None, log=print)
    assert t.sleeps == []


def test_unknown_names_stop_the_scenario_before_any_step(state_file: Path) -> None:
    sc = Scenario.parse(
        {
            "steps": [
                {"at": 0, "set": "node=edge-a-1", "cpu": 0.9},
                {"at": 5, "node_down": "edge-z-1"},
            ]
        },
        "s.yaml",
    )
    before = simstate.load(state_file)
    with pytest.raises(TestbedError, match=r"s.yaml: steps\[1\]: unknown node 'edge-z-1'"):
        run(
            sc,
            state_file,
            clock=FakeTime().clock,
            sleep=FakeTime().sleep,
            on_node=lambda n, u: None,
            log=print,
        )
    assert simstate.load(state_file) == before


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "steps:\n  - at: soon\n    set: link=edge-a:cloud\n",
            r"steps\[0\]\.at: 'soon' is not a time",
        ),
        ("steps:\n  - {set: 'node=edge-a-1', cpu: 0.5}\n", r"steps\[0\]: needs 'at'"),
        ("steps:\n  - {at: 1s, cpu: 0.5}\n", r"steps\[0\]: needs exactly one of set, node_down"),
        ("steps:\n  - {at: 1s, set: 'node=a', node_down: a}\n", r"steps\[0\]: needs exactly one"),
        (
            "steps:\n  - {at: 1s, set: 'node=a', cpu: 0.2}\n  - {at: 2s, set: 'node=a', cpu: 2}\n",
            r"steps\[1\]\.cpu: .*fraction between 0 and 1",
        ),
        (
            "steps:\n  - {at: 1s, set: 'link=a:b', bw: 2Mbit}\n",
            r"steps\[0\]\.bw: .*unknown key 'bw'",
        ),
        ("steps:\n  - {at: 1s, set: 'link=a:b'}\n", r"steps\[0\]\.set: .*nothing to set"),
        ("steps:\n  - {at: 1s, set: 'pod=x', cpu: 1}\n", r"steps\[0\]\.set: .*expected node=NAME"),
        ("steps:\n  - {at: 1s, node_down: a, cpu: 1}\n", r"steps\[0\]\.cpu: unknown key"),
        ("steps:\n  - {at: -1s, node_down: a}\n", r"steps\[0\]\.at: .*not a time"),
        ("steps:\n  - {at: 1s, node_down: [a]}\n", r"steps\[0\]\.node_down: expected a node name"),
        ("steps:\n  - [1s, node_down]\n", r"steps\[0\]: expected a mapping"),
        ("steps: []\n", r"'steps' is empty"),
        ("stepz: []\n", r"expected a mapping with a 'steps' list"),
        ("steps: [{at: 1s, node_up: a}]\nrepeat: 3\n", r"unknown key\(s\) repeat"),
        ("steps: [\n", r"not valid YAML"),
    ],
)
def test_malformed_files_name_the_step_and_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(TestbedError, match=message):
        Scenario.load(write(tmp_path, text))


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TestbedError, match=r"absent.yaml: cannot read the scenario"):
        Scenario.load(tmp_path / "absent.yaml")


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_example_scenarios_parse_and_fit_the_demo_cluster(path: Path) -> None:
    sc = Scenario.load(path)
    sc.check(SimState.from_layout(parse_nodes("edge-a=2,edge-b=2,cloud=2")))
    assert sc.steps and sc.duration_s >= sc.steps[-1].at_s


def test_roles_are_resolved_when_their_step_is_played(state_file: Path) -> None:
    sc = Scenario.parse(
        {
            "steps": [
                {"at": 10, "node_down": "plan:first-node"},
                {"at": 20, "set": "node=plan:last-node", "cpu": 0.99},
                {"at": 30, "node_up": "plan:downed"},
            ]
        }
    )
    t = FakeTime()
    plans = {"plan:first-node": ["edge-a-1"], "plan:last-node": ["cloud-2"]}
    asked: list[tuple[str, float]] = []

    def resolve(role: str) -> str:
        asked.append((role, t.now - 50.0))
        return plans[role][0]

    calls: list[tuple[str, bool]] = []
    lines: list[str] = []
    played = run(
        sc,
        state_file,
        clock=t.clock,
        sleep=t.sleep,
        on_node=lambda n, up: calls.append((n, up)),
        log=lines.append,
        resolve=resolve,
    )
    assert asked == [("plan:first-node", 10.0), ("plan:last-node", 20.0)]
    assert calls == [("edge-a-1", False), ("edge-a-1", True)]
    assert [p.node for p in played] == ["edge-a-1", "cloud-2", "edge-a-1"]
    assert simstate.load(state_file).node("cloud-2").cpu_utilisation == 0.99
    assert "node_down edge-a-1 (plan:first-node)" in lines[0]


def test_roles_need_a_resolver_and_must_be_known(state_file: Path, tmp_path: Path) -> None:
    sc = Scenario.parse({"steps": [{"at": 0, "node_down": "plan:first-node"}]}, "r.yaml")
    with pytest.raises(TestbedError, match=r"r.yaml: .*give the model"):
        run(sc, state_file, clock=FakeTime().clock, sleep=FakeTime().sleep,
            on_node=lambda n, u: None, log=print)  # fmt: skip
    with pytest.raises(TestbedError, match=r"steps\[0\]\.node_down: 'plan:middle' is not a role"):
        Scenario.load(write(tmp_path, "steps:\n  - {at: 1s, node_down: 'plan:middle'}\n"))
