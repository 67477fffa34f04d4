"""The results model: every results.json ever written loads, today's writers' output validates strictly, and
docs/results.md documents every field.

The files in tests/data/results/ were written by the bench itself at the commit of each schema version (see the
README there); they are kept as written.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from pydantic import ValidationError

from bench.errors import UsageError
from bench.harness import runner
from bench.results import SCHEMA_VERSION, environment, git_commit, write_results
from bench.results.model import (
    CapacityStep,
    Results,
    UslFit,
    Variant,
    field_reference,
    read_results,
    results_json_schema,
)
from bench.scenario import load_scenario
from tests.conftest import ROOT, SCENARIOS

DATA = Path(__file__).parent / "data" / "results"
FIXTURE_NAME = re.compile(r"v(\d+)-(run|capacity|load|external|recompute|forward|windows)\.json")
# One file of each version and kind; v9-faults.json (a failed fault run, see the README there) has tests of its own.
FIXTURES = sorted(p for p in DATA.glob("v*.json") if FIXTURE_NAME.fullmatch(p.name))
V9_FAULTS = DATA / "v9-faults.json"
DOC = ROOT / "docs" / "results.md"
REFERENCE_START = "<!-- field reference: generated from bench/results/model.py, do not edit by hand -->"
REFERENCE_END = "<!-- end of the field reference -->"
UPDATE_DOCS = "BENCH_UPDATE_DOCS"


def _version_and_kind(path: Path) -> tuple[int, str]:
    found = FIXTURE_NAME.fullmatch(path.name)
    assert found, f"fixture names are v<version>-<run|capacity|load>.json: {path.name}"
    return int(found.group(1)), found.group(2)


def _raw(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def _differences(dumped: Any, given: Any, where: str = "$") -> list[str]:
    """Where two JSON values differ, int and float told apart (0 and 0.0 print differently), key order not."""
    if isinstance(dumped, dict) and isinstance(given, dict):
        out = [f"{where}.{k}: not in the model's dump" for k in given.keys() - dumped.keys()]
        out += [f"{where}.{k}: only in the model's dump" for k in dumped.keys() - given.keys()]
        for key in dumped.keys() & given.keys():
            out += _differences(dumped[key], given[key], f"{where}.{key}")
        return out
    if isinstance(dumped, list | tuple) and isinstance(given, list | tuple):
        if len(dumped) != len(given):
            return [f"{where}: {len(dumped)} items, given {len(given)}"]
        return [
            d for i, (a, b) in enumerate(zip(dumped, given, strict=True)) for d in _differences(a, b, f"{where}[{i}]")
        ]
    if type(dumped) is not type(given) or dumped != given:
        return [f"{where}: {dumped!r}, given {given!r}"]
    return []


def _as_json(results: Results) -> Any:
    return json.loads(json.dumps(results.to_json()))


# ----------------------------------------------------------------------------- every version loads


def test_there_is_a_fixture_of_every_older_version_and_kind() -> None:
    found = {_version_and_kind(p) for p in FIXTURES}
    assert {v for v, _ in found} == set(range(1, SCHEMA_VERSION)), "a file of every version before this one"
    # Capacity sweeps and load runs arrived in version 5.
    for version in range(5, SCHEMA_VERSION):
        assert {(version, "capacity"), (version, "load")} <= found, version


@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_every_fixture_loads(path: Path) -> None:
    version, kind = _version_and_kind(path)
    results = read_results(path)
    assert results.schema_version == version
    assert results.variants
    assert results.kind == ("capacity" if kind == "capacity" else None)
    assert (results.capacity is not None) == (kind == "capacity")
    assert all(v.load is not None for v in results.variants) == (kind == "load")
    # A run of an external system (version 11 on): its process, and its output judged by truth label.
    assert all(v.system is not None and v.system.kind == "external" for v in results.variants) == (kind == "external")
    # The other pipeline shapes (version 12 on): each variant carries its shape's own part.
    for shape in ("recompute", "forward", "windows"):
        assert all(getattr(v, shape) is not None for v in results.variants) == (kind == shape), shape
    for v in results.variants:
        assert v.ledger.reconciled is True
        # An external system's bad input it left out is set aside by truth label (version 11 on).
        aside = v.ledger.not_persisted_expected or 0
        assert v.ledger.sent == v.ledger.persisted + v.ledger.rejected + v.ledger.dropped + v.ledger.lost + aside
    if results.capacity is not None:
        steps = [st for sr in results.capacity.series for st in sr.steps]
        assert steps and all(st.verdict is not None for st in steps)
    # What the model holds is what the exported schema describes, whatever version it was read from.
    jsonschema.validate(_as_json(results), results_json_schema())


@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_a_fixture_reads_back_as_written_except_what_the_model_migrates(path: Path) -> None:
    """Nothing is lost in reading but what a migration says: a removed key, a value fitted from stored data, a key
    of an intermediate commit that no version defines."""
    migrated = {
        "throughput.wall_s": "removed in version 2",
        "append_cost.slope_summary": "fitted from the points for files before version 7",
        "steps[0].bench_cpu_pct": "an intermediate key of version 5 (broker_cpu_pct and machine_cpu_pct replaced it)",
        "steps[0].bench_hosts_broker": "likewise",
        "steps[1].bench_cpu_pct": "likewise",
        "steps[1].bench_hosts_broker": "likewise",
    }
    diffs = _differences(_as_json(read_results(path)), _raw(path))
    unexplained = [d for d in diffs if not any(key + ":" in d for key in migrated)]
    assert not unexplained, unexplained
    if _version_and_kind(path)[0] == SCHEMA_VERSION - 1:
        assert not diffs, "the previous version differs from this one by an added field only"


def test_older_files_are_migrated_in_the_model() -> None:
    v1 = read_results(DATA / "v1-run.json")
    assert "wall_s" in _raw(DATA / "v1-run.json")["variants"][0]["throughput"]
    assert v1.variants[0].throughput.sink_rows_per_s is None

    # Before version 7 the append slope had no interval: the model fits it from the stored points.
    v2 = read_results(DATA / "v2-run.json")
    raw = _raw(DATA / "v2-run.json")["variants"][0]["probes"]["append_cost"]
    assert "slope_summary" not in raw
    cost = v2.variants[0].probes.append_cost
    assert cost is not None and cost.slope_summary is not None and "ms/MB" in cost.slope_summary

    # The intermediate capacity keys are left out; the steps keep everything else.
    v5 = read_results(DATA / "v5-capacity.json")
    assert v5.capacity is not None
    step = v5.capacity.series[0].steps[0]
    assert "bench_cpu_pct" in _raw(DATA / "v5-capacity.json")["capacity"]["series"][0]["steps"][0]
    assert "bench_cpu_pct" not in step.model_dump() and step.cpu_pct is not None


def test_every_file_in_the_fixture_folder_is_known() -> None:
    assert sorted(DATA.glob("v*.json")) == sorted([*FIXTURES, V9_FAULTS])


# ----------------------------------------------------------------------------- version 9's fault events


def test_version_9_fault_events_get_what_their_ledger_settles_and_no_more() -> None:
    """A real v9 fault run (ten kill -9 and a restart, naive beside crash_safe): expected_loss by the rule the v9
    bench applied, a count only where the ledger settles it per fault, null (not 0) where it does not."""
    raw = _raw(V9_FAULTS)
    results = read_results(V9_FAULTS)
    naive, crash_safe = results.variants
    assert naive.ledger.dropped_by_reason == {"process_kill": 3600} and naive.ledger.lost == 0
    assert naive.fault_events is not None and crash_safe.fault_events is not None
    kills = [e for e in naive.fault_events if e.kind == "process_kill"]
    (restart,) = [e for e in naive.fault_events if e.kind == "process_restart"]
    assert len(kills) == 10
    for e in naive.fault_events:
        assert e.expected_loss is True, "naive durability: a crash is expected to lose"
        assert (e.lost, e.duplicated) == (0, 0), "the ledger lost nothing and nothing arrived twice"
        assert e.duration_s is None and e.latency_ms is None and e.latency_kind is None and e.detail is None
    assert all(e.named is None and not e.counted for e in kills), "3,600 named by ten kills: which one is unknown"
    assert restart.named == 0 and restart.counted, "the only restart, and the ledger named nothing by it"
    for e in crash_safe.fault_events:
        assert e.expected_loss is False, "crash-safe at QoS 1 promised to survive a crash"
        assert (e.named, e.lost, e.duplicated) == (0, 0, 0) and e.counted

    diffs = _differences(_as_json(results), raw)
    filled = ("expected_loss", "named", "lost", "duplicated")
    assert diffs and all(re.search(rf"fault_events\[\d+\]\.({'|'.join(filled)}): only in", d) for d in diffs), diffs
    assert results.failures == [] and all(v.unreadable_files == [] for v in results.variants)
    jsonschema.validate(_as_json(results), results_json_schema())


def _v9_with(events: list[dict[str, Any]], **ledger: Any) -> dict[str, Any]:
    data = _raw(DATA / "v9-run.json")
    variant = data["variants"][0]
    variant["ledger"].update(ledger)
    variant["fault_events"] = events
    return data


@pytest.mark.parametrize(
    ("durability", "qos", "expected"),
    [("naive", 1, True), ("crash_safe", 1, False), ("crash_safe", 0, True)],
)
def test_version_9_expected_loss_is_the_rule_of_its_bench(durability: str, qos: int, expected: bool) -> None:
    data = _v9_with([{"kind": "process_kill", "at_s": 2.0, "recovered_s": 1.4, "error": None}])
    data["variants"][0]["config"]["pipeline"]["durability"] = durability
    data["variants"][0]["config"]["transport"]["qos"] = qos
    (event,) = Results.model_validate(data).variants[0].fault_events or []
    assert event.expected_loss is expected


def test_version_9_counts_stay_unknown_where_the_ledger_cannot_tell() -> None:
    kill = {"kind": "process_kill", "at_s": 2.0, "recovered_s": 1.4, "error": None}
    outage = {"kind": "server_restart", "at_s": 5.0, "recovered_s": 3.0, "error": None}
    data = _v9_with(
        [kill, outage, {**kill, "at_s": 9.0}],
        lost=4,
        persisted=186,
        duplicates=1,
        dropped_by_reason={"server_outage": 10},
    )
    first, server, second = Results.model_validate(data).variants[0].fault_events or []
    assert (first.named, second.named) == (0, 0), "no loss named by process_kill at all"
    assert server.named == 10 and server.expected_loss is True, "the only outage: all of server_outage is its"
    assert all(e.lost is None and e.duplicated is None for e in (first, server, second)), "lost somewhere: unknown"


def test_a_current_file_with_fault_costs_failures_and_unreadable_files_validates_strictly() -> None:
    data = _raw(DATA / "v9-run.json")
    data["schema_version"] = SCHEMA_VERSION
    variant = data["variants"][0]
    variant["fault_events"] = [
        {
            "kind": "broker_partition",
            "at_s": 4.0,
            "recovered_s": 6.2,
            "error": None,
            "duration_s": 5.0,
            "expected_loss": True,
            "named": 120,
            "lost": 0,
            "duplicated": 3,
            "latency_ms": {"p50": 812.0, "p99": 5120.5, "max": 5230.0},
            "latency_kind": "receive",
            "detail": "mode drop",
        }
    ]
    variant["unreadable_files"] = ["/out/data/readings-x.parquet: Parquet magic bytes not found in footer"]
    data["failures"] = [{"variant": "sql", "error": "ServiceError: the database refused the connection"}]
    results = Results.model_validate(data)
    assert not _differences(_as_json(results), data), "the model holds every key, as written"
    (event,) = results.variants[0].fault_events or []
    assert event.counted and event.latency_ms is not None and event.latency_ms.p99 == 5120.5
    assert results.failures[0].variant == "sql"
    jsonschema.validate(data, results_json_schema())

    bad = copy.deepcopy(data)
    bad["variants"][0]["fault_events"][0]["latency_kind"] = "e2e"
    with pytest.raises(ValidationError, match="latency_kind"):
        Results.model_validate(bad)
    bad = copy.deepcopy(data)
    bad["failures"][0]["reason"] = bad["failures"][0].pop("error")
    with pytest.raises(ValidationError, match=r"failures\.0\.reason"):
        Results.model_validate(bad)


def test_a_step_without_a_verdict_gets_it_from_sustainable() -> None:
    assert CapacityStep.model_validate({"offered_per_s": 100.0, "sustainable": False}).verdict == "unsustainable"
    assert CapacityStep.model_validate({"offered_per_s": 100.0, "sustainable": True}).verdict == "sustainable"
    assert CapacityStep.model_validate({"offered_per_s": 100.0}).verdict is None


def test_an_unknown_key_in_an_older_file_is_left_out(tmp_path: Path) -> None:
    data = _raw(DATA / "v6-run.json")
    data["variants"][0]["ledger"]["an_old_key"] = 3
    (tmp_path / "results.json").write_text(json.dumps(data), encoding="utf-8")
    assert read_results(tmp_path).variants[0].ledger.persisted == data["variants"][0]["ledger"]["persisted"]


def test_a_newer_file_is_refused_naming_both_versions(tmp_path: Path) -> None:
    data = _raw(DATA / "v7-run.json")
    data["schema_version"] = SCHEMA_VERSION + 1
    (tmp_path / "results.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(UsageError, match=f"schema_version {SCHEMA_VERSION + 1}.*reads up to {SCHEMA_VERSION}"):
        read_results(tmp_path)


# ----------------------------------------------------------------------------- today's writers


@pytest.fixture(scope="module")
def fresh_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``bench run`` in this process (the runner the command and the report's tests call): steady.yaml on the
    memory transport, 200 messages, the probes' overhead measured too."""
    folder = tmp_path_factory.mktemp("run")
    text = (SCENARIOS / "steady.yaml").read_text(encoding="utf-8")
    scenario = folder / "steady.yaml"
    scenario.write_text(
        text.replace("transport:\n  mqtt:\n    broker: embedded\n    qos: 1\n", "transport:\n  kind: memory\n"),
        encoding="utf-8",
    )
    assert "kind: memory" in scenario.read_text(encoding="utf-8")
    out = folder / "out"
    outcome = runner.run(load_scenario(scenario), runner.RunOptions(out=out, messages=200))
    assert outcome.ok, outcome.problems()
    return out / "results.json"


def test_todays_writers_output_validates_strictly(fresh_run: Path) -> None:
    data = _raw(fresh_run)
    assert data["schema_version"] == SCHEMA_VERSION, "the current version: unknown keys are errors"
    results = Results.model_validate(data)
    assert not _differences(_as_json(results), data), "the model holds every key, as written"
    assert results.environment.git_commit == git_commit()
    (variant,) = results.variants
    assert variant.ledger.persisted == 200 and variant.config.transport is not None
    jsonschema.validate(data, results_json_schema())


def test_a_misspelt_key_from_a_writer_is_an_error(fresh_run: Path, tmp_path: Path) -> None:
    data = _raw(fresh_run)
    data["variants"][0]["ledger"]["persited"] = data["variants"][0]["ledger"]["persisted"]
    with pytest.raises(ValidationError, match=r"variants\.0\.ledger\.persited"):
        Results.model_validate(data)
    (tmp_path / "results.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(UsageError) as info:
        read_results(tmp_path)
    message = str(info.value)
    assert str(tmp_path / "results.json") in message and "variants[0].ledger.persited: unknown key" in message
    assert info.value.exit_code == 2


def test_the_model_writes_the_same_file_a_writer_dict_gives(fresh_run: Path, tmp_path: Path) -> None:
    data = _raw(fresh_run)
    from_dict, from_model = tmp_path / "dict.json", tmp_path / "model.json"
    write_results(from_dict, data)
    Results.model_validate(data).write(from_model)
    assert json.loads(from_model.read_text(encoding="utf-8")) == json.loads(from_dict.read_text(encoding="utf-8"))
    assert not _differences(json.loads(from_model.read_text(encoding="utf-8")), data)
    assert read_results(from_model) == Results.model_validate(data)
    assert not list(tmp_path.glob("*.tmp")), "written through a temporary file, renamed into place"


def test_a_writer_can_build_the_parts() -> None:
    """What a writer that builds the model instead of a dict gets: unset fields stay out of the file."""
    results = read_results(DATA / "v7-run.json")
    built = Results(
        schema_version=SCHEMA_VERSION,
        run_id="steady-1",
        started_at=results.started_at,
        scenario=results.scenario,
        environment=results.environment.model_copy(update={"git_commit": None}),
        variants=[Variant.model_validate(v.model_dump(exclude_unset=True)) for v in results.variants],
    )
    written = built.to_json()
    assert "kind" not in written and "capacity" not in written
    assert written["variants"][0]["ledger"] == results.variants[0].ledger.model_dump(exclude_unset=True)


def test_a_key_that_is_a_python_keyword_keeps_its_json_name() -> None:
    usl = UslFit.model_validate({"lambda": 390.0, "sigma": 0.7, "kappa": 0.0})
    assert usl.lambda_ == 390.0
    assert usl.model_dump()["lambda"] == 390.0, "written under its JSON name"


# ----------------------------------------------------------------------------- reading errors


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("{not json", "not valid JSON (line 1"),
        ("[1, 2]", "expected a JSON object"),
        ('{"schema_version": 5}', "expected a bench results file"),
        ('{"schema_version": 8, "variants": [1]}', "expected a bench results file"),
    ],
)
def test_a_bad_file_is_a_usage_error_naming_it(content: str, expected: str, tmp_path: Path) -> None:
    (tmp_path / "results.json").write_text(content, encoding="utf-8")
    with pytest.raises(UsageError, match=re.escape(expected)) as info:
        read_results(tmp_path / "results.json")
    assert str(tmp_path / "results.json") in str(info.value)


def test_a_folder_without_results_is_named(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"no results\.json in this folder"):
        read_results(tmp_path)
    with pytest.raises(UsageError, match="no such file or folder"):
        read_results(tmp_path / "nowhere")


# ----------------------------------------------------------------------------- the environment's commit


def _git(*args: str, cwd: Path) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_git_commit_reads_the_checkout(tmp_path: Path) -> None:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = tmp_path / "repo"
    repo.mkdir()
    _git("init", "-q", "-b", "main", cwd=repo)
    (repo / "a.txt").write_text("a", encoding="utf-8")
    _git("add", "a.txt", cwd=repo)
    _git("-c", "user.name=t", "-c", "user.email=t@example.org", "commit", "-q", "-m", "a", cwd=repo)
    head = _git("rev-parse", "HEAD", cwd=repo)
    assert git_commit(repo) == head, "a branch in a loose ref"
    _git("pack-refs", "--all", cwd=repo)
    assert not (repo / ".git" / "refs" / "heads" / "main").exists()
    assert git_commit(repo) == head, "a packed ref"
    _git("worktree", "add", "-q", "--detach", str(tmp_path / "wt"), cwd=repo)
    assert git_commit(tmp_path / "wt") == head, "a worktree (.git is a file)"
    _git("worktree", "add", "-q", "-b", "other", str(tmp_path / "wt2"), cwd=repo)
    assert git_commit(tmp_path / "wt2") == head, "a worktree on a branch: the ref is in the shared repository"


def test_git_commit_is_none_outside_a_checkout_and_never_fails(tmp_path: Path) -> None:
    assert git_commit(tmp_path) is None
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_bytes(b"\xff\xfe garbage")
    assert git_commit(tmp_path) is None
    assert environment()["git_commit"] == git_commit()


# ----------------------------------------------------------------------------- the schema and the docs


def test_the_json_schema_is_the_models() -> None:
    schema = results_json_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert f"schema_version {SCHEMA_VERSION}" in schema["title"]
    environment_def = schema["$defs"]["Environment"]
    assert "git_commit" in environment_def["properties"]
    assert environment_def["additionalProperties"] is False
    assert "lambda" in schema["$defs"]["UslFit"]["properties"], "keys as in the file (aliases)"
    jsonschema.Draft202012Validator.check_schema(schema)


def _documented_reference(text: str) -> str:
    start, end = text.find(REFERENCE_START), text.find(REFERENCE_END)
    assert 0 <= start < end, f"docs/results.md lacks the generated field reference between {REFERENCE_START!r} and "
    return text[start + len(REFERENCE_START) : end].strip("\n") + "\n"


def test_docs_field_reference_is_the_models() -> None:
    """docs/results.md's field reference is generated from the model; regenerate it after changing the model:
    ``BENCH_UPDATE_DOCS=1 .venv/bin/pytest tests/test_results_model.py -k field_reference``."""
    text = DOC.read_text(encoding="utf-8")
    generated = field_reference()
    if os.environ.get(UPDATE_DOCS) == "1":
        start, end = text.index(REFERENCE_START) + len(REFERENCE_START), text.index(REFERENCE_END)
        DOC.write_text(text[:start] + "\n\n" + generated + "\n" + text[end:], encoding="utf-8")
        text = DOC.read_text(encoding="utf-8")
    assert _documented_reference(text).strip() == generated.strip(), (
        f"docs/results.md's field reference is out of date; run {UPDATE_DOCS}=1 .venv/bin/pytest "
        "tests/test_results_model.py -k field_reference"
    )


def test_every_field_is_in_the_reference_and_the_changelog_has_this_version() -> None:
    reference = field_reference()
    for model in re.findall(r"^#### (\w+)$", reference, re.M):
        assert f"(#{model.lower()})" in reference or model == "Results", f"{model} is linked from its parent"
    text = DOC.read_text(encoding="utf-8")
    assert f"- **{SCHEMA_VERSION}**:" in text, "docs/results.md's changelog names the current version"
    assert "`environment.git_commit`" in text
