"""A size-limited output location for the ``disk_full`` fault: a tmpfs mounted over the pipeline's data folder.

The fault fills it (a preallocated filler file takes every free byte), so the pipeline's next write fails with
ENOSPC as on a full disk, then frees it again. After the run the files are copied off the tmpfs back into the
same folder on disk, so the read-back and the run folder are as for any other run. Mounting needs root (or
CAP_SYS_ADMIN); without it the run stops before it starts, with that reason.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

from bench.errors import ServiceError

FILLER = ".bench-disk-full"
"""The file that takes the space; never read back (the ledger reads ``*.parquet`` only)."""


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, check=False, timeout=30)


class TmpfsVolume:
    """``mount -t tmpfs -o size=N`` over ``path`` for the run; :meth:`fill` and :meth:`free` make the disk full
    and give the space back; :meth:`unmount` keeps the files (copied back onto the disk underneath)."""

    def __init__(self, path: Path, size_mb: float) -> None:
        self.path = path
        self.size_kb = max(64, int(size_mb * 1024))
        self.mounted = False
        self.filled_bytes = 0

    def mount(self) -> TmpfsVolume:
        if os.geteuid() != 0:
            raise ServiceError(
                f"disk_full: mounting a {self.size_kb // 1024} MB tmpfs on {self.path} needs root "
                "(or CAP_SYS_ADMIN); run the scenario as root or remove the disk_full fault"
            )
        self.path.mkdir(parents=True, exist_ok=True)
        if any(self.path.iterdir()):
            raise ServiceError(f"disk_full: {self.path} is not empty; the tmpfs would hide what it holds")
        done = _run(["mount", "-t", "tmpfs", "-o", f"size={self.size_kb}k,mode=0755", "tmpfs", str(self.path)])
        if done.returncode != 0:
            raise ServiceError(f"disk_full: cannot mount a tmpfs on {self.path}: {done.stderr.strip()}")
        self.mounted = True
        return self

    def fill(self) -> None:
        """Take every free byte: the next write of the pipeline fails with ENOSPC."""
        filler = self.path / FILLER
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            st = os.statvfs(self.path)
            free = st.f_bavail * st.f_frsize
            if free > 0:
                try:
                    os.posix_fallocate(fd, os.fstat(fd).st_size, free)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
            # Whatever fallocate could not take (block rounding), written a page at a time until ENOSPC.
            page = b"\0" * 4096
            while True:
                try:
                    os.write(fd, page)
                except OSError as exc:
                    if exc.errno == errno.ENOSPC:
                        break
                    raise
            self.filled_bytes = os.fstat(fd).st_size
        finally:
            os.close(fd)

    def free(self) -> None:
        (self.path / FILLER).unlink(missing_ok=True)

    def unmount(self) -> None:
        """Copy the files off the tmpfs, unmount it, put them back in the same folder on disk. Idempotent."""
        if not self.mounted:
            return
        self.free()
        keep = self.path.with_name(f".{self.path.name}.tmpfs-copy")
        shutil.rmtree(keep, ignore_errors=True)
        shutil.copytree(self.path, keep, symlinks=True)
        done = _run(["umount", str(self.path)])
        if done.returncode != 0:
            # Busy (a process still holds a file): detach it now, the kernel frees it when the last one closes.
            done = _run(["umount", "-l", str(self.path)])
        self.mounted = done.returncode != 0
        if self.mounted:
            raise ServiceError(f"disk_full: cannot unmount the tmpfs on {self.path}: {done.stderr.strip()}")
        shutil.copytree(keep, self.path, symlinks=True, dirs_exist_ok=True)
        shutil.rmtree(keep, ignore_errors=True)
