"""Certificates and policy names for secured OPC UA runs: generated per run, never committed."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from asyncua.crypto.cert_gen import setup_self_signed_certificate
from cryptography.x509.oid import ExtendedKeyUsageOID

from pipeline.private_key import FOLDER_MODE, KEY_MODE, write_private_key

__all__ = ["FOLDER_MODE", "KEY_MODE", "CertPair", "make_certificate", "write_private_key"]

Mode = Literal["Sign", "SignAndEncrypt"]


@dataclass(frozen=True)
class CertPair:
    key: Path
    cert: Path


async def make_certificate(folder: Path, name: str, app_uri: str, server: bool) -> CertPair:
    """A self-signed key (mode 0600, in a 0700 folder) and certificate (valid one year) in ``folder``."""
    folder.mkdir(mode=FOLDER_MODE, parents=True, exist_ok=True)
    # mkdir's mode passes through the umask and does nothing for a folder that exists: set it outright.
    folder.chmod(FOLDER_MODE)
    pair = CertPair(folder / f"{name}-key.pem", folder / f"{name}-cert.der")
    # asyncua writes a new key with the umask's mode (0644 as a rule); written here first, it finds the
    # key and only makes the certificate.
    write_private_key(pair.key)
    await setup_self_signed_certificate(
        pair.key,
        pair.cert,
        app_uri,
        socket.gethostname(),
        [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH],
        {"countryName": "XX", "organizationName": "iiot-bench", "commonName": name},
    )
    return pair
