"""Signed apps: the publisher signs the exact FAB that `flwr run` ships; a site runs an
app only when a key it trusts signed it.

Flower 1.41's own check (`flower-supernode --trusted-entities`) accepts only FABs that
carry a Flower Hub licence record, which the SuperLink sets for Hub downloads alone, so
every locally built FAB is refused with it. fedslm keeps Flower's formats (the
trusted-entities YAML, Ed25519 keys, the message `signed_at || sha256(FAB)`) and moves
the check into the site's own worker (fedslm.site.worker), which verifies a run's FAB
before any of its code is imported.

The signature cannot live inside the FAB it signs, so it travels as a run-config value
(`app-signature`, empty in pyproject). FAB builds are byte-for-byte deterministic (fixed
zip dates, sorted paths), so the publisher signs `build_fab_from_disk(app)` and `flwr run`
ships the same bytes; any change to a shipped file changes the hash and the site refuses.

This module is loaded by file path in the site's app host, before the app's own `fedslm`
is importable: it may import only the standard library, cryptography and flwr.
"""

from __future__ import annotations

import base64
import hashlib
import time
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

SIGNATURE_KEY = "app-signature"


class UnsignedAppError(Exception):
    """A run's app is not signed by a key the site trusts; the message says why."""


def _message(fab_digest: bytes, signed_at: int) -> bytes:
    # the layout of flwr.supercore.primitives.asymmetric_ed25519.create_message_to_sign
    return signed_at.to_bytes(8, "big") + fab_digest


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def key_id(public_key: ed25519.Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "fpk_" + hashlib.sha256(raw).hexdigest()[:16]


def load_private_key(path: Path) -> ed25519.Ed25519PrivateKey:
    try:
        key = serialization.load_ssh_private_key(Path(path).read_bytes(), password=None)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path}: not an unencrypted OpenSSH private key ({err}); create one with "
                         f"`ssh-keygen -t ed25519 -N '' -f {path}`") from err
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ValueError(f"{path}: a publisher key must be Ed25519 (ssh-keygen -t ed25519), as Flower's are")
    return key


def trusted_entity(public_key_path: Path) -> tuple[str, str]:
    """(key id, OpenSSH public key line): one entry of a site's trusted-entities YAML."""
    line = Path(public_key_path).read_text().strip()
    key = serialization.load_ssh_public_key(line.encode())
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ValueError(f"{public_key_path}: a publisher key must be Ed25519")
    return key_id(key), line


def fab_bytes(app_dir: Path) -> bytes:
    """The FAB `flwr run APP_DIR` builds and ships."""
    from flwr.cli.build import build_fab_from_disk

    return build_fab_from_disk(Path(app_dir))


def sign_fab(fab: bytes, private_key: ed25519.Ed25519PrivateKey, signed_at: int | None = None) -> str:
    """The `app-signature` value: key id, signing time and signature, colon-separated."""
    signed_at = int(time.time()) if signed_at is None else signed_at
    signature = private_key.sign(_message(hashlib.sha256(fab).digest(), signed_at))
    return f"{key_id(private_key.public_key())}:{signed_at}:{_b64url(signature)}"


def load_trusted(path: Path) -> dict[str, ed25519.Ed25519PublicKey]:
    """A trusted-entities YAML in Flower's format: `{key_id: "ssh-ed25519 AAAA... [comment]"}`."""
    import yaml

    path = Path(path)
    try:
        entries = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"trusted entities {path}: cannot read it ({err})") from err
    if not isinstance(entries, dict) or not entries:
        raise ValueError(f"trusted entities {path}: must map key ids to 'ssh-ed25519 ...' public keys "
                         "(`fedslm trusted-entity PUBLISHER_KEY.pub` prints an entry)")
    keys = {}
    for kid, line in entries.items():
        try:
            key = serialization.load_ssh_public_key(str(line).encode())
        except (ValueError, TypeError) as err:
            raise ValueError(f"trusted entities {path}: {kid}: not an OpenSSH public key ({err})") from err
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise ValueError(f"trusted entities {path}: {kid}: must be an Ed25519 key")
        keys[str(kid)] = key
    return keys


def check_fab(fab: bytes, signature: str, trusted: dict[str, ed25519.Ed25519PublicKey]) -> str:
    """Raise UnsignedAppError unless `signature` is a trusted key's signature of `fab`;
    returns the key id that signed it."""
    digest = hashlib.sha256(fab).hexdigest()
    if not signature:
        raise UnsignedAppError(f"the app (FAB sha256 {digest[:16]}) is not signed: the run config has no "
                               f"{SIGNATURE_KEY} (the publisher signs with `fedslm sign-app`)")
    try:
        kid, signed_at, sig = signature.split(":")
        message, raw = _message(bytes.fromhex(digest), int(signed_at)), _unb64url(sig)
    except (ValueError, OverflowError):
        raise UnsignedAppError(f"{SIGNATURE_KEY} is malformed (want KEY_ID:SIGNED_AT:SIGNATURE)") from None
    if kid not in trusted:
        raise UnsignedAppError(f"the app (FAB sha256 {digest[:16]}) is signed by {kid}, a key this site does not "
                               f"trust (trusted: {', '.join(sorted(trusted))})")
    try:
        trusted[kid].verify(raw, message)
    except InvalidSignature:
        raise UnsignedAppError(f"the signature by {kid} does not match this app (FAB sha256 {digest[:16]}): the "
                               "app was changed after it was signed, or the signature is for another app") from None
    return kid
