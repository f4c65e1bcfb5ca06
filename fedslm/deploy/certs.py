"""Development certificates for a deployed federation: a CA, the SuperLink's TLS
certificate, and one node-authentication key pair per site.

For trying a deployment on one machine or a test bed only. A hospital's production
SuperNode trusts the coordinator's certificate through the hospital's own PKI, and each
site generates its own key pair on its own machine (the private key never leaves it);
only the public key goes to the coordinator for `flwr supernode register`.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PRODUCTION_NOTE = (
    "These are development certificates. In production the SuperLink's certificate comes "
    "from the hospital's own PKI (its CA file is what each site passes as --root-certificates), "
    "and each site creates its own key pair on its own machine and sends only the .pub file "
    "to the coordinator."
)

# flwr checks that node keys are on a NIST curve; P-384 is what its docs use
NODE_CURVE = ec.SECP384R1()


@dataclass
class CertPaths:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    site_keys: list[tuple[Path, Path]]  # (private OpenSSH key, public OpenSSH key) per site
    # the app publisher's Ed25519 pair (fedslm sign-app; sites trust the .pub), and per site
    # the secret its SuperNode and worker share (--superexec-auth-secret-file)
    publisher_key: Path | None = None
    publisher_pub: Path | None = None
    site_secrets: list[Path] = field(default_factory=list)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedslm development"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(host: str) -> x509.GeneralName:
    # An IP address must be an IPAddress entry: TLS clients do not match IPs against DNS names
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _write(path: Path, data: bytes, private: bool = False, overwrite: bool = False) -> Path:
    """Create `path` with owner-only permissions from the first byte when `private` (not
    chmod after a write under the umask, which leaves a window where others can read the
    key). An existing file is never silently replaced."""
    if overwrite:
        path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def _refuse_existing(paths: list[Path]) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing:
        raise FileExistsError(f"{', '.join(existing)} already exist; keys are never replaced silently "
                              "(pass --force to make new ones, and re-register the sites' public keys)")


def make_certs(out_dir: Path | str, hosts: list[str], sites: int, days: int = 365, overwrite: bool = False) -> CertPaths:
    """Write ca.crt, server.pem, server.key and site-N(.pub) under out_dir; refuses to
    replace any of them unless `overwrite`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = ["ca.crt", "server.pem", "server.key", "publisher", "publisher.pub"] + [
        f"site-{i}{ext}" for i in range(sites) for ext in ("", ".pub", ".secret")]
    if not overwrite:
        _refuse_existing([out / n for n in names])
    now = dt.datetime.now(dt.timezone.utc)
    # a minute of slack: a site whose clock runs slightly behind still accepts the cert
    start, end = now - dt.timedelta(minutes=1), now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("fedslm development CA")).issuer_name(_name("fedslm development CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0])).issuer_name(ca_cert.subject)
        .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    paths = CertPaths(
        ca_cert=_write(out / "ca.crt", ca_cert.public_bytes(pem), overwrite=overwrite),
        server_cert=_write(out / "server.pem", server_cert.public_bytes(pem), overwrite=overwrite),
        server_key=_write(out / "server.key", server_key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()), private=True, overwrite=overwrite),
        site_keys=[],
    )
    for site in range(sites):
        paths.site_keys.append(make_node_keys(out, f"site-{site}", overwrite=overwrite))
        paths.site_secrets.append(_write(out / f"site-{site}.secret", os.urandom(32), private=True, overwrite=overwrite))
    paths.publisher_key, paths.publisher_pub = make_publisher_key(out, overwrite=overwrite)
    return paths


def make_publisher_key(out_dir: Path | str, name: str = "publisher", overwrite: bool = False) -> tuple[Path, Path]:
    """An Ed25519 pair in the OpenSSH format (what `ssh-keygen -t ed25519` writes and
    Flower's trusted entities hold): the app publisher signs with it, sites trust the .pub."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not overwrite:
        _refuse_existing([out / name, out / f"{name}.pub"])
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return (_write(out / name, private, private=True, overwrite=overwrite),
            _write(out / f"{name}.pub", public + b" fedslm-publisher\n", overwrite=overwrite))


def make_node_keys(out_dir: Path | str, name: str, overwrite: bool = False) -> tuple[Path, Path]:
    """An EC key pair in the OpenSSH format that flower-supernode
    (--auth-supernode-private-key) and `flwr supernode register` read."""
    out = Path(out_dir)
    if not overwrite:
        _refuse_existing([out / name, out / f"{name}.pub"])
    key = ec.generate_private_key(NODE_CURVE)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return (_write(out / name, private, private=True, overwrite=overwrite),
            _write(out / f"{name}.pub", public + b"\n", overwrite=overwrite))
