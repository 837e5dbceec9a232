"""A development certificate authority for mutual TLS (``asyndgan certs init`` / ``certs issue NAME``).

Each service gets a certificate whose subject alternative names are its name (the site id, or
``generator``) plus ``localhost``/``127.0.0.1``; the generator checks a site's certificate against the site
name it was configured with. For production, use your own PKI: the services only need PEM files.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from asyndgan.io import write_bytes_atomic

__all__ = ["init_ca", "issue"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,62}$")
_VALID_DAYS = 365


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    write_bytes_atomic(path, pem, mode=0o600)


def init_ca(directory: Path, name: str = "asyndgan dev CA") -> Path:
    """Create ``ca.pem`` and ``ca.key`` in ``directory`` (refuses to overwrite an existing CA)."""
    directory = Path(directory)
    if (directory / "ca.pem").exists():
        raise FileExistsError(f"a CA already exists in {directory}")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=10 * _VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(key, hashes.SHA256())
    )
    _write_key(directory / "ca.key", key)
    write_bytes_atomic(directory / "ca.pem", cert.public_bytes(serialization.Encoding.PEM))
    return directory / "ca.pem"


def issue(directory: Path, name: str, extra_hosts: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """Issue ``NAME.pem``/``NAME.key`` signed by the CA in ``directory``; usable as server and client."""
    if not _NAME.match(name):
        raise ValueError(f"invalid certificate name {name!r}: letters, digits, '.' and '-' only")
    directory = Path(directory)
    if not (directory / "ca.pem").exists():
        raise FileNotFoundError(f"no CA in {directory}: run `asyndgan certs init` first")
    ca_cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError("unsupported CA key type")
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(name), x509.DNSName("localhost")]
    sans.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    for host in extra_hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=_VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key_path, cert_path = directory / f"{name}.key", directory / f"{name}.pem"
    _write_key(key_path, key)
    write_bytes_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path
