"""Signed apps without processes: what the publisher signs is what `flwr run` ships, the
signature is Flower's own format, and each way of getting an unsigned or altered app past
a site is refused with a reason. (On loopback: tests/test_deployment.py.)"""

from __future__ import annotations

import hashlib
import json
import zipfile
from io import BytesIO

import pytest

from fedslm.cli import main as cli
from fedslm.config.compose import REPO_ROOT
from fedslm.deploy.certs import make_publisher_key
from fedslm.deploy.signing import (
    SIGNATURE_KEY, UnsignedAppError, check_fab, fab_bytes, load_private_key, load_trusted, sign_fab,
)


@pytest.fixture(scope="module")
def app() -> bytes:
    return fab_bytes(REPO_ROOT)


@pytest.fixture
def keys(publisher):
    private, trusted, kid = publisher
    return load_private_key(private), load_trusted(trusted), kid


def _with_extra_file(fab: bytes, name: str, content: bytes) -> bytes:
    out = BytesIO()
    with zipfile.ZipFile(BytesIO(fab)) as src, zipfile.ZipFile(out, "w") as dst:
        for item in src.infolist():
            dst.writestr(item, src.read(item))
        dst.writestr(name, content)
    return out.getvalue()


def test_the_build_is_deterministic_and_ships_the_app(app):
    assert fab_bytes(REPO_ROOT) == app  # the bytes signed are the bytes `flwr run` builds again
    names = zipfile.ZipFile(BytesIO(app)).namelist()
    assert "client/app.py" in names and "fedslm/site/handlers.py" in names and "fedslm/deploy/signing.py" in names


def test_a_signed_app_is_admitted(app, keys):
    private, trusted, kid = keys
    assert check_fab(app, sign_fab(app, private), trusted) == kid


def test_the_signature_is_flowers_own_format(app, keys):
    """Flower's SuperNode check (`_verify_fab`, used with --trusted-entities for Hub apps)
    accepts the same signature: the message layout and key ids are Flower's."""
    from cryptography.hazmat.primitives import serialization
    from flwr.supercore.fab import Fab
    from flwr.supernode.start_client_internal import _verify_fab

    private, trusted, kid = keys
    _, signed_at, sig = sign_fab(app, private).split(":")
    ssh = trusted[kid].public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    entities = {kid: ssh}
    fab = Fab(hashlib.sha256(app).hexdigest(), app, {kid: json.dumps({"signature": sig, "signed_at": int(signed_at)})})
    assert _verify_fab(fab, entities)
    tampered = Fab(fab.hash_str, app + b"\0", fab.verifications)
    assert not _verify_fab(tampered, entities)


def test_an_unsigned_app_is_refused(app, keys):
    _, trusted, _ = keys
    with pytest.raises(UnsignedAppError, match=f"not signed: the run config has no {SIGNATURE_KEY}"):
        check_fab(app, "", trusted)


def test_an_app_signed_by_another_key_is_refused(app, keys, tmp_path):
    _, trusted, kid = keys
    stranger, _ = make_publisher_key(tmp_path / "stranger")
    with pytest.raises(UnsignedAppError, match=f"a key this site does not trust \\(trusted: {kid}\\)"):
        check_fab(app, sign_fab(app, load_private_key(stranger)), trusted)


def test_a_stranger_claiming_the_trusted_key_id_is_refused(app, keys, tmp_path):
    _, trusted, kid = keys
    stranger, _ = make_publisher_key(tmp_path / "stranger")
    _, signed_at, sig = sign_fab(app, load_private_key(stranger)).split(":")
    with pytest.raises(UnsignedAppError, match="does not match this app"):
        check_fab(app, f"{kid}:{signed_at}:{sig}", trusted)


def test_an_app_changed_after_signing_is_refused(app, keys):
    """The coordinator signs, then slips one more module into the FAB (or changes one):
    the hash differs and the signature no longer holds."""
    private, trusted, _ = keys
    signature = sign_fab(app, private)
    changed = _with_extra_file(app, "fedslm/site/exfiltrate.py", b"import os\n")
    with pytest.raises(UnsignedAppError, match="was changed after it was signed"):
        check_fab(changed, signature, trusted)
    # a signature's time is part of what is signed: it cannot be moved either
    kid, signed_at, sig = signature.split(":")
    with pytest.raises(UnsignedAppError, match="does not match"):
        check_fab(app, f"{kid}:{int(signed_at) + 1}:{sig}", trusted)


def test_a_malformed_signature_is_refused(app, keys):
    _, trusted, _ = keys
    for bad in ("nonsense", "a:b:c", "a:1", f"{list(trusted)[0]}:-1:AAAA", f"{list(trusted)[0]}:{2**70}:AAAA"):
        with pytest.raises(UnsignedAppError, match="malformed"):
            check_fab(app, bad, trusted)


def test_trusted_entities_must_be_ed25519_keys(tmp_path, capsys):
    from fedslm.deploy.certs import make_node_keys

    _, ec_pub = make_node_keys(tmp_path, "node")
    bad = tmp_path / "bad.yaml"
    bad.write_text(f'fpk_x: "{ec_pub.read_text().strip()}"\n')
    with pytest.raises(ValueError, match="must be an Ed25519 key"):
        load_trusted(bad)
    bad.write_text("- just a list\n")
    with pytest.raises(ValueError, match="must map key ids"):
        load_trusted(bad)
    # the worker refuses to start on such a file, before it serves anything
    assert cli(["site", "--trusted-entities", str(bad)]) == 2
    assert "must map key ids" in capsys.readouterr().err


def test_sign_app_and_trusted_entity_commands(tmp_path, capsys, keys, app):
    private, public = make_publisher_key(tmp_path / "pub")
    out = tmp_path / "app-signature.txt"
    assert cli(["sign-app", str(REPO_ROOT), "--key", str(private), "--out", str(out)]) == 0
    assert f"FAB sha256 {hashlib.sha256(app).hexdigest()[:16]}" in capsys.readouterr().out
    assert cli(["trusted-entity", str(public)]) == 0
    (tmp_path / "trusted.yaml").write_text(capsys.readouterr().out)
    key, value = out.read_text().strip().split("=", 1)
    assert key == SIGNATURE_KEY
    assert check_fab(app, json.loads(value), load_trusted(tmp_path / "trusted.yaml")).startswith("fpk_")
    # an EC node key is not a publisher key
    from fedslm.deploy.certs import make_node_keys

    node, _ = make_node_keys(tmp_path, "node")
    assert cli(["sign-app", str(REPO_ROOT), "--key", str(node), "--out", str(out)]) == 2
    assert "must be Ed25519" in capsys.readouterr().err


def test_the_signature_key_is_a_run_config_key_the_config_ignores():
    from fedslm.config.flat import DEPLOYMENT_KEYS, from_run_config
    from fedslm.config.pyproject import pyproject_table

    assert DEPLOYMENT_KEYS == {SIGNATURE_KEY: ""}
    assert pyproject_table()[SIGNATURE_KEY] == ""  # flwr run may override only keys the app declares
    assert from_run_config({SIGNATURE_KEY: "k:1:s"}) == from_run_config({})
