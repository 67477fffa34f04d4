"""Output paths stay inside the output folder unless a section says ``allow_outside_output: true``.

pipeline/config.py refuses, at validation, an absolute or ``..``-climbing parquet path, quarantine path,
SQLite file in sql.url and OPC UA cert_dir; pipeline/runtime.py applies the same rule to settings built
without validation; ``bench validate`` and ``python -m pipeline --config`` say so in one line, exit 2.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from bench.cli import main
from pipeline.clock import MonotonicWallClock
from pipeline.config import (
    OpcUaSourceSettings,
    ParquetSettings,
    PipelineSettings,
    QuarantineSettings,
    SqlSettings,
    format_validation_error,
    output_path_problem,
)
from pipeline.errors import ConfigError
from pipeline.runtime import Pipeline
from tests.conftest import run_module

ESCAPING = ["../../../../tmp/x", "/tmp/x", "a/../../x", "./../x", "..", "data/../../x", "//tmp/x"]
INSIDE = ["data", "a/b/c", "a/../b", "./data", "..data", "data..", ".", "a/b/../../c"]


@pytest.mark.parametrize("path", ESCAPING)
@pytest.mark.parametrize("section", [ParquetSettings, QuarantineSettings])
def test_escaping_folders_are_refused(section: type[ParquetSettings | QuarantineSettings], path: str) -> None:
    with pytest.raises(ValidationError) as info:
        section(path=path)
    message = format_validation_error("s.yaml", info.value)
    assert message.startswith("s.yaml: path: expected a path inside the output folder, got "), message
    assert repr(path) in message
    opt_in = "pipeline.parquet" if section is ParquetSettings else "pipeline.quarantine"
    assert message.endswith(f"; set {opt_in}.allow_outside_output: true to write there on purpose")
    assert "\n" not in message


@pytest.mark.parametrize("path", INSIDE)
@pytest.mark.parametrize("section", [ParquetSettings, QuarantineSettings])
def test_folders_inside_are_accepted(section: type[ParquetSettings | QuarantineSettings], path: str) -> None:
    assert section(path=path).path == path


@pytest.mark.parametrize("path", ESCAPING)
@pytest.mark.parametrize("section", [ParquetSettings, QuarantineSettings])
def test_the_opt_in_allows_any_folder(section: type[ParquetSettings | QuarantineSettings], path: str) -> None:
    assert section(path=path, allow_outside_output=True).path == path


def test_nul_is_refused_even_with_the_opt_in() -> None:
    with pytest.raises(ValidationError, match="path: expected a path without NUL characters"):
        ParquetSettings(path="da\x00ta", allow_outside_output=True)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("sqlite:///../../../../tmp/x.db", "climbs out with '..'"),
        ("sqlite:////tmp/x.db", "is absolute"),
        ("sqlite:///a/../../x.db", "climbs out with '..'"),
        ("sqlite:///%2E%2E/x.db", "climbs out with '..'"),  # SQLAlchemy decodes the path: so does the check
        ("sqlite+pysqlite:////tmp/x.db", "is absolute"),
        ("sqlite:///file:x.db?uri=true", "is a URI filename"),
    ],
)
def test_sqlite_files_outside_are_refused(url: str, problem: str) -> None:
    with pytest.raises(ValidationError) as info:
        SqlSettings(url=url)
    message = format_validation_error("s.yaml", info.value)
    assert message.startswith("s.yaml: url: expected a SQLite file inside the output folder, but the SQLite file ")
    assert problem in message and "set pipeline.sql.allow_outside_output: true" in message
    assert SqlSettings(url=url, allow_outside_output=True).url == url


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:///loading_rate.db",
        "sqlite:///sub/x.db",
        "sqlite://",
        "sqlite:///:memory:",
        "${BENCH_SQL_URL}",  # checked once resolved, when the sink opens (tests/test_sql_sink.py)
        "postgresql+psycopg://postgres@127.0.0.1:5432/test",  # a server has no path here
    ],
)
def test_sql_urls_inside_or_without_a_file_are_accepted(url: str) -> None:
    assert SqlSettings(url=url).url == url


@pytest.mark.parametrize("cert_dir", ["/tmp/certs", "../certs"])
def test_opcua_cert_dir_must_stay_inside(cert_dir: str) -> None:
    with pytest.raises(ValidationError, match="cert_dir: expected a path inside the output folder"):
        OpcUaSourceSettings(url="opc.tcp://127.0.0.1:4840/", cert_dir=cert_dir)
    assert OpcUaSourceSettings(url="opc.tcp://h:4840/", cert_dir=cert_dir, allow_outside_output=True).cert_dir


@settings(max_examples=2_000, deadline=None, derandomize=True, database=None)
@given(st.lists(st.sampled_from(["a", "b", "..", ".", "", "x..", "..y"]), max_size=8).map("/".join))
def test_the_check_agrees_with_the_file_system(path: str) -> None:
    """Relative paths: refused exactly when the folder they name is not the output folder or below it."""
    base = Path("/srv/run/out")
    resolved = Path(os.path.normpath(base / path))
    inside = resolved == base or base in resolved.parents
    assert (output_path_problem(path) is None) == inside, (path, resolved)


def test_the_pipeline_refuses_settings_that_skipped_validation(tmp_path: Path) -> None:
    # model_construct skips the validators: the pipeline checks again where the paths become folders.
    escaping = PipelineSettings().model_copy(
        update={"quarantine": QuarantineSettings.model_construct(path="../../x", allow_outside_output=False)}
    )
    with pytest.raises(ConfigError, match=r"^pipeline\.quarantine\.path: expected a path inside the output folder"):
        Pipeline(escaping, tmp_path / "out", MonotonicWallClock())
    assert not (tmp_path / "x").exists()


def test_bench_validate_refuses_an_escaping_path_in_one_line(
    write_scenario: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_scenario(
        "name: x\nphases:\n  - {kind: steady, rate: 10, duration: 1}\n"
        "pipeline:\n  parquet: {path: ../../../../tmp/x}\n  quarantine: {path: /tmp/q}\n"
        "  sql: {url: 'sqlite:///../../../../tmp/x.db'}\n"
    )
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: pipeline.parquet: path: expected a path inside the output folder" in err
    assert f"{path}: pipeline.quarantine: path: expected a path inside the output folder" in err
    assert f"{path}: pipeline.sql: url: expected a SQLite file inside the output folder" in err
    assert "Traceback" not in err


def test_bench_validate_accepts_the_opt_in(
    write_scenario: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_scenario(
        "name: x\nphases:\n  - {kind: steady, rate: 10, duration: 1}\n"
        "pipeline:\n  parquet: {path: /srv/shared/data, allow_outside_output: true}\n"
    )
    assert main(["validate", str(path)]) == 0, capsys.readouterr().err


@pytest.mark.parametrize(
    ("pipeline", "field"),
    [
        ("parquet: {path: ../../escaped}", "pipeline.parquet: path"),
        ("quarantine: {path: /tmp/escaped}", "pipeline.quarantine: path"),
        ("sql: {url: 'sqlite:///../escaped.db'}", "pipeline.sql: url"),
    ],
)
def test_standalone_pipeline_refuses_an_escaping_path(tmp_path: Path, pipeline: str, field: str) -> None:
    config = tmp_path / "pipeline.yaml"
    out = tmp_path / "run" / "out"
    config.write_text(f"source: {{url: 'mqtt://127.0.0.1:1'}}\noutput: {out}\npipeline:\n  {pipeline}\n")
    proc = run_module("pipeline", "--config", str(config))
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"pipeline: error: {config}: {field}: expected "), proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    # Refused before anything was made, inside or outside.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipeline.yaml"]


def test_standalone_opcua_cert_dir_is_under_the_output_folder(tmp_path: Path) -> None:
    config = tmp_path / "pipeline.yaml"
    config.write_text("source: {url: 'opc.tcp://127.0.0.1:4840/', cert_dir: /tmp/certs}\n")
    proc = run_module("pipeline", "--config", str(config))
    assert proc.returncode == 2
    assert f"{config}: source.opcua: cert_dir: expected a path inside the output folder" in proc.stderr
