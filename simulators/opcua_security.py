"""Certificates and policy names for secured OPC UA runs: generated per run, never committed."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from asyncua.crypto.cert_gen import setup_self_signed_certificate
from cryptography.x509.oid import ExtendedKeyUsageOID

Mode = Literal["Sign", "SignAndEncrypt"]


@dataclass(frozen=True)
class CertPair:
    key: Path
    cert: Path


async def make_certificate(folder: Path, name: str, app_uri: str, server: bool) -> CertPair:
    """A self-signed key and certificate (valid one year) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    pair = CertPair(folder / f"{name}-key.pem", folder / f"{name}-cert.der")
    await setup_self_signed_certificate(
        pair.key,
        pair.cert,
        app_uri,
        socket.gethostname(),
        [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH],
        {"countryName": "XX", "organizationName": "iiot-bench", "commonName": name},
    )
    return pair
