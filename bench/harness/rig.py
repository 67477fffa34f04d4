"""What a scenario's faults need in place before the system under test starts, and removed after it stops.

A ``db_outage`` needs a proxy between the pipeline and its database (the pipeline's SQL URL points at it; for an
external system, the URL it is given as ``{sql_url}`` while the bench reads back from the database itself), a
``disk_full`` a size-limited volume over the data folder, a ``sink_error`` the pipeline's fault-injection file
(the pipeline's cooperation: it reads the file before each write). ``broker_partition`` is the session's
(the proxy sits between the pipeline and the broker the session resolves). One :class:`FaultRig` per variant.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from bench.errors import ScenarioError
from bench.harness.volume import TmpfsVolume
from bench.scenario import (
    BrokerPartitionFault,
    DbOutageFault,
    DiskFullFault,
    ExternalSystem,
    Scenario,
    SinkErrorFault,
)
from pipeline.config import PipelineSettings, resolve_env
from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from bench.harness.proxy import FaultProxy

INJECTION_FILE = "fault-injection.json"
"""Relative to the pipeline's output folder (pipeline.fault_injection)."""

_DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306, "mariadb": 3306}


def external_database(spec: ExternalSystem) -> str | None:
    """The URL of an external system's database (system.external.database, ${ENV} resolved), or None."""
    try:
        return resolve_env(spec.database, "system.external.database")
    except ConfigError as exc:
        raise ScenarioError(str(exc)) from None


def sql_placeholders(url: str | None) -> dict[str, str]:
    """``{sql_url}``, ``{sql_host}`` and ``{sql_port}`` of a database URL; empty strings without one.

    Host and port apart, for a pipeline whose driver does not take SQLAlchemy URLs (``postgresql+psycopg://``
    means nothing to node-postgres): they are the only parts the bench changes, the rest is the user's own."""
    if not url:
        return {"sql_url": "", "sql_host": "", "sql_port": ""}
    try:
        parsed = make_url(url)
    except ArgumentError:
        # Never quoted back: it may come from the environment with a password in it.
        raise ScenarioError(
            "system.external.database: expected a SQLAlchemy URL such as postgresql+psycopg://user@127.0.0.1:5432/db"
        ) from None
    port = parsed.port or _DEFAULT_PORTS.get(parsed.get_backend_name())
    return {"sql_url": url, "sql_host": parsed.host or "", "sql_port": "" if port is None else str(port)}


class FaultRig:
    """Proxies, volumes and files a variant's faults act on; :meth:`close` removes them (idempotent)."""

    def __init__(self, sc: Scenario, settings: PipelineSettings, out_dir: Path) -> None:
        self.settings = settings
        self.out_dir = out_dir
        self.partition = any(isinstance(f, BrokerPartitionFault) for f in sc.faults)
        self.db_proxy: FaultProxy | None = None
        self.external_sql_url: str | None = None
        """What an external system is given as {sql_url} instead of its database's own URL (the proxy's)."""
        self.volume: TmpfsVolume | None = None
        self.injection_file: Path | None = None
        self._stack = ExitStack()
        try:
            self._set_up(sc)
        except BaseException:
            self._stack.close()
            raise

    def _set_up(self, sc: Scenario) -> None:
        if any(isinstance(f, SinkErrorFault) for f in sc.faults):
            self.settings = self.settings.model_copy(update={"fault_injection": INJECTION_FILE})
            self.injection_file = self.out_dir / INJECTION_FILE
            self.injection_file.unlink(missing_ok=True)
        if any(isinstance(f, DbOutageFault) for f in sc.faults):
            if sc.system.external is not None:
                # The scenario checked that the command is given the database's URL by placeholder.
                database = external_database(sc.system.external)
                assert database is not None
                self.external_sql_url = self._proxy(database, "system.external.database")
            else:
                self._proxy_database()
        disk = [f.volume_mb for f in sc.faults if isinstance(f, DiskFullFault)]
        if disk:
            self.volume = TmpfsVolume(self.out_dir / self.settings.parquet.path, max(disk)).mount()
            self._stack.callback(self.volume.unmount)

    def _proxy_database(self) -> None:
        sql = self.settings.sql
        assert sql is not None  # the scenario refuses db_outage without a SQL sink
        proxied = self._proxy(sql.url, "pipeline.sql.url")
        self.settings = self.settings.model_copy(update={"sql": sql.model_copy(update={"url": proxied})})

    def _proxy(self, database: str, field: str) -> str:
        """Start the proxy in front of ``database``; the same URL with the proxy's host and port (driver, user,
        password and database kept)."""
        from bench.harness.proxy import FaultProxy

        try:
            url = make_url(database)
        except ArgumentError:
            raise ScenarioError(
                f"faults: db_outage needs {field} as a literal URL (the bench puts a proxy in front of "
                "the database and must know its host and port)"
            ) from None
        backend = url.get_backend_name()
        port = url.port or _DEFAULT_PORTS.get(backend)
        if port is None or not url.host:
            raise ScenarioError(
                f"faults: db_outage needs {field} to name a database server with a host, got backend {backend}"
            )
        proxy = FaultProxy(url.host, port).start()
        self._stack.callback(proxy.close)
        self.db_proxy = proxy
        return url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)

    def release_storage(self) -> None:
        """Once the system under test has stopped: the volume's files back on disk, before the read-back."""
        if self.volume is not None:
            self.volume.unmount()

    def close(self) -> None:
        self._stack.close()
