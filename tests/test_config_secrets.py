"""Credentials in URLs: refused in settings files without being quoted, redacted in every error.

pipeline/config.py: url_credential_problem (what validation refuses), redact_url (what errors show),
scrub (a driver's message with the URL's secrets removed), and format_validation_error, which redacts any
URL another module's validator quotes back. The SQL sink's connection errors are in test_sql_sink.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from bench.cli import main
from pipeline.config import (
    MqttSourceSettings,
    OpcUaSourceSettings,
    SqlSettings,
    format_validation_error,
    redact_url,
    redact_urls_in,
    scrub,
    url_credential_problem,
)
from tests.conftest import ROOT, require_service

SECRET = "hunter2xyz"
SCENARIO = "name: x\nphases:\n  - {kind: steady, rate: 10, duration: 1}\n"

# Every credential a shipped driver takes from a URL query: libpq (psycopg) and PyMySQL.
DRIVER_CREDENTIALS = (
    "password",
    "passfile",
    "sslpassword",
    "oauth_client_secret",
    "scram_client_key",
    "scram_server_key",
    "passwd",
    "ssl_key_password",
)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (f"postgresql+psycopg://app:{SECRET}@db:5432/plant", "postgresql+psycopg://app:***@db:5432/plant"),
        (f"postgresql://app:a/{SECRET}@db/plant", "postgresql://app:***@db/plant"),
        (f"postgresql://app:a?{SECRET}@db/plant", "postgresql://app:***@db/plant"),
        (f"mqtt://op:p@{SECRET}@broker:1883", "mqtt://op:***@broker:1883"),  # urllib: the last '@'
        (
            f"mysql+pymysql://root@db/test?charset=utf8mb4&passwd={SECRET}",
            "mysql+pymysql://root@db/test?charset=utf8mb4&passwd=***",
        ),
        (f"postgresql://db/plant?pass%77ord={SECRET}", "postgresql://db/plant?pass%77ord=***"),
        (f"postgresql://db/plant?PASS%2557ORD={SECRET}", "postgresql://db/plant?PASS%2557ORD=***"),
        (f"mssql+pyodbc://db?odbc_connect=DSN%3Dx%3BPWD%3D{SECRET}", "mssql+pyodbc://db?odbc_connect=***"),
        (f"postgresql://db/x?dbname=postgresql://u:{SECRET}@h/d", "postgresql://db/x?dbname=***"),
        ("postgresql://app@db:5432/plant?sslmode=require", "postgresql://app@db:5432/plant?sslmode=require"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert SECRET not in redact_url(url)
    assert url_credential_problem(url) is not None or url == shown


@settings(max_examples=1_000, deadline=None, derandomize=True, database=None)
@given(
    name=st.sampled_from(DRIVER_CREDENTIALS),
    case=st.lists(st.booleans(), min_size=20, max_size=20),
    encode=st.lists(st.booleans(), min_size=20, max_size=20),
    twice=st.booleans(),
    secret=st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=4, max_size=16),
    before=st.sampled_from(["", "sslmode=require&", "application_name=passenger&"]),
    dialect=st.sampled_from(["postgresql+psycopg", "mysql+pymysql"]),
)
def test_any_spelling_of_a_driver_credential_is_refused_and_redacted(
    *, name: str, case: list[bool], encode: list[bool], twice: bool, secret: str, before: str, dialect: str
) -> None:
    """Mixed case, any characters percent-encoded (once or twice), any secret: refused, never shown."""
    letters = [c.upper() if upper else c for c, upper in zip(name, case, strict=False)]
    escape = "%25{:02X}" if twice else "%{:02X}"
    spelled = "".join(escape.format(ord(c)) if e else c for c, e in zip(letters, encode, strict=False))
    url = f"{dialect}://app@db:5432/plant?{before}{spelled}={quote(secret, safe='')}"
    assert url_credential_problem(url) is not None, url
    redacted = redact_url(url)
    assert quote(secret, safe="") not in redacted and redacted.endswith(f"{spelled}=***")
    assert redact_url(redacted) == redacted  # errors pass through more than one redaction
    # Through the settings: refused, and the one-line error quotes neither the URL nor the secret.
    with pytest.raises(ValidationError) as info:
        SqlSettings(url=url)
    message = format_validation_error("s.yaml", info.value)
    assert quote(secret, safe="") not in message and "\n" not in message


def test_scrub_removes_the_secrets_of_the_url_from_any_text() -> None:
    url = f"postgresql+psycopg://app:{SECRET}@db/plant?sslpassword=k3y-{SECRET}"
    text = f"could not connect with {SECRET} / k3y-{SECRET} to {url}"
    cleaned = scrub(text, url)
    assert SECRET not in cleaned
    assert cleaned == "could not connect with *** / *** to postgresql+psycopg://app:***@db/plant?sslpassword=***"


def test_redact_urls_in_leaves_text_without_urls_alone() -> None:
    assert redact_urls_in("expected mqtt://host[:port], got 'x'") == "expected mqtt://host[:port], got 'x'"
    assert redact_urls_in(f"got 'http://u:{SECRET}@h', then x") == "got 'http://u:***@h', then x"


@pytest.mark.parametrize(
    ("model", "url", "reference"),
    [
        (MqttSourceSettings, f"mqtt://op:{SECRET}@127.0.0.1:1883", "${MQTT_PASSWORD}"),
        (OpcUaSourceSettings, f"opc.tcp://op:{SECRET}@127.0.0.1:4840/", "${OPCUA_PASSWORD}"),
    ],
)
def test_source_urls_refuse_a_password(
    model: type[MqttSourceSettings | OpcUaSourceSettings], url: str, reference: str
) -> None:
    with pytest.raises(ValidationError) as info:
        model(url=url)
    message = format_validation_error("p.yaml", info.value)
    assert message == (
        "p.yaml: url: expected no password in the URL (a password in user:password@); "
        f"give username, and password as {reference}"
    )


@pytest.mark.parametrize(
    ("model", "url"),
    [(MqttSourceSettings, f"http://op:{SECRET}@127.0.0.1"), (OpcUaSourceSettings, f"http://op:{SECRET}@h:4840/")],
)
def test_a_wrong_scheme_is_quoted_redacted(model: type[MqttSourceSettings | OpcUaSourceSettings], url: str) -> None:
    with pytest.raises(ValidationError) as info:
        model(url=url)
    message = format_validation_error("p.yaml", info.value)
    assert "got 'http://op:***@" in message and SECRET not in message


@pytest.mark.parametrize(
    "url",
    [
        f"mysql+pymysql://root@127.0.0.1/test?passwd={SECRET}",
        f"postgresql+psycopg://postgres@127.0.0.1:5432/test?pass%77ord={SECRET}",
        f"postgresql+psycopg://postgres:{SECRET}@127.0.0.1:5432/test",
    ],
)
def test_bench_refuses_the_url_before_making_a_run_folder(
    write_scenario: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], url: str
) -> None:
    """The issue's URLs: refused at validation, so nothing (scenario copy, results.json) can hold them."""
    path = write_scenario(SCENARIO + f"pipeline:\n  sql: {{url: '{url}'}}\n")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: pipeline.sql.url: expected no password in the URL (" in err and SECRET not in err
    assert main(["run", str(path), "--out", str(tmp_path / "r"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert SECRET not in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_format_validation_error_redacts_a_url_another_validator_quotes(
    write_scenario: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # bench/scenario.py's broker check quotes the value back; the formatter hides its password.
    path = write_scenario(SCENARIO + f"transport: {{mqtt: {{broker: 'http://op:{SECRET}@broker'}}}}\n")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: transport.mqtt.broker:" in err and SECRET not in err


@pytest.mark.services
def test_standalone_pipeline_never_prints_the_environment_password(tmp_path: Path) -> None:
    """BENCH_SQL_URL with ?password= against a server that refuses the connection: one redacted line, exit 2."""
    require_service("PostgreSQL", "127.0.0.1", 5432)
    config = tmp_path / "pipeline.yaml"
    config.write_text(
        "source: {url: 'mqtt://127.0.0.1:1'}\n"
        f"output: {tmp_path / 'out'}\n"
        "pipeline: {sql: {url: '${BENCH_SQL_URL}'}}\n"
    )
    env = {**os.environ, "BENCH_SQL_URL": f"postgresql+psycopg://postgres@127.0.0.1:5432/no_such_db?password={SECRET}"}
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "--config", str(config)],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("pipeline: error: cannot open SQL sink postgresql+psycopg://postgres@127.0.0.1")
    assert "no_such_db?password=***: OperationalError" in proc.stderr and SECRET not in proc.stderr + proc.stdout
    assert proc.stderr.count("\n") == 1
