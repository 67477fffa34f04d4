"""Private keys written owner-only: the OPC UA client's and the plant server's, for secured sessions."""

from __future__ import annotations

import os
from pathlib import Path

from asyncua.crypto.cert_gen import dump_private_key_as_pem, generate_private_key

KEY_MODE = 0o600
"""A private key is readable by its owner only."""
FOLDER_MODE = 0o700
"""The folder holding it, likewise: nobody else may list, replace or plant files there."""


def write_private_key(path: Path) -> None:
    """Generate an RSA key into ``path``, mode 0600 from the first byte on; an existing key is kept.

    Created with O_EXCL and the mode given to open(): the file is never, even briefly, readable by others
    (a chmod after writing would leave a window; the umask can only take bits away). A key already there is
    kept, as asyncua would keep it, with its mode tightened.
    """
    if path.exists():
        path.chmod(KEY_MODE)
        return
    pem = dump_private_key_as_pem(generate_private_key())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, KEY_MODE)
    with os.fdopen(fd, "wb") as handle:
        os.fchmod(handle.fileno(), KEY_MODE)
        handle.write(pem)
