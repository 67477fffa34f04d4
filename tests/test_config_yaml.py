"""load_yaml_mapping (pipeline/config.py, used for scenarios and pipeline configs): hostile nesting.

A file nested 10,000 levels deep once ended in a RecursionError traceback 2,999 lines long. Now any file
deeper than MAX_YAML_DEPTH gives one line naming the file (and where), at once: checked in CPU time, so a
busy neighbour cannot fail it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from bench.cli import main
from bench.errors import ScenarioError
from bench.scenario import load_scenario
from pipeline.config import MAX_YAML_DEPTH, MAX_YAML_MERGED, load_yaml_mapping, nesting_depth
from pipeline.errors import ConfigError
from tests.conftest import run_module

DEEP = 10_000
STEADY = "phases:\n  - {kind: steady, rate: 10, duration: 1}\n"


QUICK_CPU_S = 5.0
"""What "at once" allows: these loads take about 0.25 s of CPU here, idle; beside two CPU-bound jobs on a shared
2-core host the same load measured 1.2 s (a virtual machine's CPU time counts what the host took from it). The
failures guarded against are far beyond: 5,000 chained merge keys without the limit took 26 s, and a deep
nesting overflows the stack. The error each test asserts is what shows a limit acted; this bound only says it
acted early."""


@contextmanager
def quickly() -> Iterator[None]:
    began = time.process_time()
    yield
    assert time.process_time() - began < QUICK_CPU_S


def flow(depth: int) -> str:
    return "name: x\n" + STEADY + "matrix: " + "[" * depth + "]" * depth + "\n"


def block(depth: int) -> str:
    # Block sequences, in the compact form (- - - x): one list per level, without indentation growing.
    return "name: x\n" + STEADY + "matrix:\n" + "- " * depth + "x\n"


def flow_mappings(depth: int) -> str:
    return "name: x\n" + STEADY + "extra: " + "{a: " * depth + "1" + "}" * depth + "\n"


@pytest.mark.parametrize("shape", [flow, block, flow_mappings])
def test_yaml_nested_10000_levels_is_one_line_at_once(tmp_path: Path, shape: Callable[[int], str]) -> None:
    path = tmp_path / "deep.yaml"
    path.write_text(shape(DEEP), encoding="utf-8")
    with quickly(), pytest.raises(ConfigError) as info:
        load_yaml_mapping(path, ConfigError)
    message = str(info.value)
    assert message.startswith(f"{path}:") and "YAML nested too deeply" in message, message
    assert "\n" not in message


def test_deep_scenario_is_exit_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "deep.yaml"
    path.write_text(flow(DEEP), encoding="utf-8")
    with quickly():
        assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "YAML nested too deeply" in err and "Traceback" not in err
    # Where the first node too deep starts: the 64th '[' on line 4 (the top mapping is the first level).
    assert f"{path}:4:{len('matrix: ') + MAX_YAML_DEPTH}:" in err, err


def test_deep_standalone_config_is_exit_2_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_text("source: " + "[" * DEEP + "]" * DEEP + "\n", encoding="utf-8")
    proc = run_module("pipeline", "--config", str(path))
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"pipeline: error: {path}:1:") and "YAML nested too deeply" in proc.stderr
    assert proc.stderr.count("\n") == 1


def test_nesting_at_the_limit_loads_and_validates_without_recursing_into_a_traceback(tmp_path: Path) -> None:
    """The deepest file allowed goes through pydantic and the matrix's deepcopy: a validation error, no trace."""
    path = tmp_path / "limit.yaml"
    # The top mapping and the matrix list are two levels; the variant's value takes the rest.
    inner = MAX_YAML_DEPTH - 3
    path.write_text(
        "name: x\n" + STEADY + "matrix:\n  - {name: v, pipeline.buffer.size: " + "[" * inner + "]" * inner + "}\n",
        encoding="utf-8",
    )
    assert nesting_depth(load_yaml_mapping(path, ConfigError)) == MAX_YAML_DEPTH
    with pytest.raises(
        ScenarioError, match=r"matrix\[0\] \(v\): pipeline.buffer.size: Input should be a valid integer"
    ):
        load_scenario(path)
    path.write_text(path.read_text().replace("[", "[[", 1).replace("]", "]]", 1), encoding="utf-8")
    with pytest.raises(ConfigError, match="YAML nested too deeply"):
        load_yaml_mapping(path, ConfigError)


def test_aliases_cannot_nest_deeper_than_the_text_shows(tmp_path: Path) -> None:
    # Each anchor holds the previous one 40 levels down: 10 of them nest 400 levels, in a few lines.
    lines = ["a0: &a0 1"]
    for i in range(1, 11):
        lines.append(f"a{i}: &a{i} " + "[" * 40 + f"*a{i - 1}" + "]" * 40)
    path = tmp_path / "aliases.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with (
        quickly(),
        pytest.raises(ConfigError, match=r"YAML nested too deeply .* counting what aliases expand to"),
    ):
        load_yaml_mapping(path, ConfigError)


def test_a_billion_laughs_is_measured_in_linear_time(tmp_path: Path) -> None:
    # 10 references per level, 9 levels: 10**9 paths, 90 distinct containers.
    lines = ["l0: &l0 [x]"]
    for i in range(1, 10):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]")
    path = tmp_path / "laughs.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with quickly():
        data = load_yaml_mapping(path, ConfigError)
    assert nesting_depth(data) == 11


def test_an_alias_inside_its_own_anchor_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "cycle.yaml"
    path.write_text("name: x\nloop: &me [1, *me]\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="YAML refers to itself"):
        load_yaml_mapping(path, ConfigError)


def test_a_long_chain_of_merge_keys_is_one_line_at_once(tmp_path: Path) -> None:
    # Each anchor merges the previous one: merges copy, so n lines build n²/2 entries (5,000: 26 s of CPU).
    lines = ["m0: &m0 {k: 0}"] + [f"m{i}: &m{i} {{<<: *m{i - 1}, k{i}: {i}}}" for i in range(1, 600)]
    path = tmp_path / "merges.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with quickly(), pytest.raises(ConfigError) as info:
        load_yaml_mapping(path, ConfigError)
    message = str(info.value)
    assert message.startswith(f"{path}:") and message.endswith(
        f"YAML merge keys (<<) copy in more than {MAX_YAML_MERGED:,} entries"
    )
    assert "\n" not in message


def test_ordinary_merge_keys_still_work(tmp_path: Path) -> None:
    path = tmp_path / "merge.yaml"
    path.write_text("base: &base {size: 10, lock: swap}\nbuffer: {<<: *base, size: 20}\n", encoding="utf-8")
    assert load_yaml_mapping(path, ConfigError)["buffer"] == {"size": 20, "lock": "swap"}


def test_nesting_depth_counts_levels() -> None:
    assert nesting_depth({}) == 1
    assert nesting_depth({"a": {"b": [1, [2]]}}) == 4
    shared = [[1]]
    assert nesting_depth({"x": shared, "y": [shared]}) == 4
    assert nesting_depth([[[[]]]], limit=2) == 3  # stops once past the limit
