"""What a scenario's faults need in place before the system under test starts, and removed after it stops.

A ``db_outage`` needs a proxy between the pipeline and its database (the pipeline's SQL URL points at it), a
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
from bench.scenario import BrokerPartitionFault, DbOutageFault, DiskFullFault, Scenario, SinkErrorFault
from pipeline.config import PipelineSettings

if TYPE_CHECKING:
    from bench.harness.proxy import FaultProxy

INJECTION_FILE = "fault-injection.json"
"""Relative to the pipeline's output folder (pipeline.fault_injection)."""

_DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306, "mariadb": 3306}


class FaultRig:
    """Proxies, volumes and files a variant's faults act on; :meth:`close` removes them (idempotent)."""

    def __init__(self, sc: Scenario, settings: PipelineSettings, out_dir: Path) -> None:
        self.settings = settings
        self.out_dir = out_dir
        self.partition = any(isinstance(f, BrokerPartitionFault) for f in sc.faults)
        self.db_proxy: FaultProxy | None = None
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
            self._proxy_database()
        disk = [f.volume_mb for f in sc.faults if isinstance(f, DiskFullFault)]
        if disk:
            self.volume = TmpfsVolume(self.out_dir / self.settings.parquet.path, max(disk)).mount()
            self._stack.callback(self.volume.unmount)

    def _proxy_database(self) -> None:
        from bench.harness.proxy import FaultProxy

        sql = self.settings.sql
        assert sql is not None  # the scenario refuses db_outage without a SQL sink
        try:
            url = make_url(sql.url)
        except ArgumentError:
            raise ScenarioError(
                "faults: db_outage needs pipeline.sql.url as a literal URL (the bench puts a proxy in front of "
                "the database and must know its host and port)"
            ) from None
        backend = url.get_backend_name()
        port = url.port or _DEFAULT_PORTS.get(backend)
        if port is None or not url.host:
            raise ScenarioError(f"faults: db_outage needs a database server URL with a host, got backend {backend}")
        proxy = FaultProxy(url.host, port).start()
        self._stack.callback(proxy.close)
        self.db_proxy = proxy
        proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        self.settings = self.settings.model_copy(update={"sql": sql.model_copy(update={"url": proxied})})

    def release_storage(self) -> None:
        """Once the system under test has stopped: the volume's files back on disk, before the read-back."""
        if self.volume is not None:
            self.volume.unmount()

    def close(self) -> None:
        self._stack.close()
