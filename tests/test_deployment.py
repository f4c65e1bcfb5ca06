"""The deployment engine on 127.0.0.1: a SuperLink with TLS and node authentication, two
SuperNodes, `flwr run`; refusals, a site lost mid-run, and the coordinator killed and
resumed. Every process is ended by pid and the ports are checked free afterwards."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from fedslm.config.pyproject import pyproject_table
from fedslm.config import ModelConfig
from fedslm.deploy.loopback import Loopback, run_config_string, wait_for
from fedslm.model import resolve_model_dir
from fedslm.server.checkpoint import Checkpoint

pytestmark = pytest.mark.deployment


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    cache = root / "models"
    resolve_model_dir(ModelConfig(source="tiny", cache_dir=str(cache)))  # sites only read the cache
    lb = Loopback(root, sites=2)
    lb.cache = cache
    # the whole run config as it is now, passed on every `flwr run`: the app is packaged
    # from the working tree at each run, and a pyproject regenerated between the first run
    # and the resumed one (it happened: grad_sample_mode hooks -> lora) makes resume refuse
    # the changed config (ServerApp exit 201)
    lb.app_config = pyproject_table()
    try:
        lb.start_federation()
        yield lb
    finally:
        # every process started here (and the SuperExec/ServerApp/ClientApp processes they
        # spawned) is killed by pid and waited for; stop() retries the ports for 30 s
        taken = lb.stop()
        assert not taken, f"ports still taken after the deployment tests: {taken}"


def _config(fed: Loopback, out: Path, **extra) -> str:
    values = dict(fed.app_config)
    values |= {
        "model.source": "tiny", "model.cache_dir": str(fed.cache), "data.max_length": 512,
        "data.train_examples": 48, "data.eval_examples": 6, "federation.sites": 2, "federation.rounds": 2,
        "federation.min_sites": 1, "federation.timeout_s": 120.0, "train.local_steps": 2, "train.batch_size": 4,
        "train.progress": False, "export_model": False, "output_dir": str(out),
    }
    values.update(extra)
    return run_config_string(values)


def test_a_site_without_a_registered_key_is_refused(fed):
    node = fed.start_node(7, key=fed.unregistered_key(), name="stranger")
    wait_for(lambda: not node.alive(), 60, "the unregistered SuperNode to give up", interval=0.5)
    assert "Failed to activate SuperNode" in node.text()
    assert "No SuperNode found with the given public key" in fed.link.text()


def test_sites_declare_a_10_s_heartbeat_so_a_lost_one_is_offline_within_20_s(fed):
    """`fedslm supernode` declares --heartbeat-s 10 (Flower's SuperNode: 30 s). The
    SuperLink's own record of each site says so; it counts a site offline after two."""
    import sqlite3

    with sqlite3.connect(fed.root / "superlink.db") as db:
        intervals = [row[0] for row in db.execute("SELECT heartbeat_interval FROM node WHERE status = 'online'")]
    assert len(intervals) >= fed.sites and set(intervals) == {10.0}


def test_a_server_the_site_does_not_trust_is_refused(fed, tmp_path):
    from fedslm.deploy.certs import make_certs

    other = make_certs(tmp_path / "other-ca", ["127.0.0.1"], sites=0)
    node = fed.start_node(0, ca=other.ca_cert, name="distrustful")
    wait_for(lambda: not node.alive(), 60, "the SuperNode to refuse the certificate", interval=0.5)
    assert "CERTIFICATE_VERIFY_FAILED" in node.text()


def test_a_site_runs_only_apps_signed_by_a_key_it_trusts(fed, tmp_path):
    """The coordinator runs the app unsigned, then signed by a key of its own: each site's
    worker refuses the run before importing any of it, says why in the site's log, and the
    coordinator sees the refusal as the sites' error replies."""
    from fedslm.config.compose import REPO_ROOT
    from fedslm.deploy.certs import make_publisher_key
    from fedslm.deploy.signing import fab_bytes, load_private_key, sign_fab

    own_key = load_private_key(make_publisher_key(tmp_path, "coordinators-own")[0])
    attempts = {
        "not signed": [],
        "does not trust": ["--run-config", f'app-signature="{sign_fab(fab_bytes(REPO_ROOT), own_key)}"'],
    }
    for reason, signature in attempts.items():
        before = [fed.workers[s].text() for s in range(fed.sites)]
        out = tmp_path / reason.replace(" ", "-")
        res = fed.flwr("run", str(REPO_ROOT), "fedslm", "--stream", "--run-config",
                       _config(fed, out, **{"federation.rounds": 1}), *signature, timeout=300)
        run_id = res.stdout.split("Successfully started run ")[1].split()[0]
        for site in range(fed.sites):
            log = fed.workers[site].text()[len(before[site]):]
            assert f"REFUSED run {run_id}: " in log and reason in log and "No code of this app was run" in log
            assert "train loss" not in log and "held-out examples" not in log  # the app never ran
        assert "the site refused the app" in res.stdout + res.stderr
        # nothing came back but the refusals: no update, no loss, no epsilon spent
        summary = json.loads((out / "summary.json").read_text())
        assert summary["bytes_up"] == 0 and summary["epsilon_per_site"] == {} and summary["eval_loss_per_site"] == {}
        refusals = summary["rejected"]["1"]
        assert len(refusals) == 2 * fed.sites and all(reason in r for r in refusals)


def test_a_site_lost_mid_run_and_the_coordinator_restarted(fed, tmp_path):
    out = tmp_path / "run"
    # round 1 waits federation.timeout_s for the lost site's training reply (and does not
    # ask it to evaluate): 30 s still covers a loaded machine's slowest live reply (round
    # 0's, which starts the app host)
    run = fed.run_async(_config(fed, out, **{"federation.timeout_s": 30.0}))
    # site 1 drops when the rounds begin: round 1 goes on with site 0 alone (min_sites=1)
    wait_for(lambda: "round 0 (base model)" in run.text(), 240, "round 0", run)
    fed.nodes[1].kill()
    # the coordinator dies as soon as round 1 is saved
    wait_for(lambda: (out / "checkpoint" / "latest").exists(), 240, "the round-1 checkpoint", run)
    fed.link.kill()
    ckpt = Checkpoint.load(out)
    saved = {"round": ckpt.server_round, "run_key": ckpt.run_key}
    assert saved["round"] == 1 and list(ckpt.parts["record"]["log"]["1"]["train"]) == ["0"]
    # site 1 was not asked to evaluate the round it never answered: one 30 s wait, not two
    round_1 = ckpt.parts["record"]["log"]["1"]
    assert list(round_1["eval"]) == ["0"] and round_1["seconds"] < 50
    wait_for(lambda: not run.alive(), 60, "flwr run to notice")

    # restart: same database (registered keys), site 1 rejoins, the run resumes from round 1
    fed.start_link()
    # started again until the SuperLink lets its key back in: the dead node's session lasts
    # until two of its 10 s heartbeats are missed (fedslm supernode --heartbeat-s), as the
    # README's supervisor does
    fed.restart_node(1, within=180)
    # site 0's SuperNode lived through the restart and reconnects on its own. The SuperLink
    # only learns a node is online from its heartbeats (and keeps the last one across the
    # restart), so no outside check can say when both are back: the resumed run itself waits
    # for both (min_sites=2 may change on resume) before it samples round 2.
    res = fed.run(_config(fed, out, resume=True, **{"federation.min_sites": 2}), timeout=420)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert f"resuming {out} after round 1/2" in res.stdout

    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    trained = {(r["round"], r["site"]) for r in rows if r["epsilon"] is not None}
    assert (1, 0) in trained and (1, 1) not in trained and {(2, 0), (2, 1)} <= trained
    eps = {(r["round"], r["site"]): r["epsilon"] for r in rows if r["epsilon"] is not None}
    # site 0's ledger went on across the coordinator's restart. Site 1 may have trained round
    # 1 before it was killed (its reply never arrived): that round is spent all the same, so
    # its epsilon is that of the rounds its ledger holds, one or two
    (ledger_1,) = (fed.root / "site-1-state").glob("ledger-*.json")
    site_1_rounds = json.loads(ledger_1.read_text())["trained"][saved["run_key"]]
    assert sorted(set(site_1_rounds)) == sorted(site_1_rounds) and 2 in site_1_rounds
    assert eps[(2, 0)] > eps[(1, 0)]
    assert eps[(2, 1)] == pytest.approx(eps[(2, 0)] if 1 in site_1_rounds else eps[(1, 0)], rel=1e-6)
    assert eps[(2, 0)] <= 8.0
    # one lifetime ledger for site 0's data set, holding this run (one run key across both
    # Flower runs); its epsilon is what the site reported
    ledgers = list((fed.root / "site-0-state").glob("ledger-*.json"))
    assert len(ledgers) == 1
    assert list(json.loads(ledgers[0].read_text())["runs"]) == [saved["run_key"]]
    listing = subprocess.run([sys.executable, "-m", "fedslm.cli", "ledger", str(fed.root / "site-0-state")],
                             capture_output=True, text=True, check=True).stdout
    assert f"run {saved['run_key']}: 2 round(s)" in listing and f"epsilon {eps[(2, 0)]:.3f}" in listing
    final = load_file(str(out / "adapters" / "round_002.safetensors"))
    assert any(t.abs().max() > 0 for k, t in final.items() if ".lora_B." in k)


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx not installed (Debian: apt-get install nginx-light)")
def test_the_public_port_serves_sites_and_not_the_control_api(fed, tmp_path):
    """The README's coordinator setup for real networks: the SuperLink on 127.0.0.1, and on
    the public address an nginx (config from `fedslm fleet-proxy`) that passes the Fleet
    API only. A site connects through it; `flwr` through it is refused (403), while the
    operators' `flwr` on the coordinator still works. (Last in the file: its extra node
    must not be sampled by another test's run.)"""
    import os

    from fedslm.deploy.certs import make_node_keys
    from fedslm.deploy.fleet_proxy import nginx_config
    from fedslm.deploy.loopback import free_port, port_is_free

    port, prefix, c = free_port(), tmp_path / "nginx", fed.certs
    prefix.mkdir()
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_config(f"127.0.0.1:{port}", f"127.0.0.1:{fed.link_port}", c.server_cert, c.server_key,
                                 c.ca_cert, prefix=prefix, run_as_root=os.geteuid() == 0))
    nginx = subprocess.Popen(["nginx", "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    node = None
    try:
        wait_for(lambda: not port_is_free(port), 30, "nginx to listen")
        with (fed.root / "flwr-home" / "config.toml").open("a") as f:
            f.write(f'\n[superlink.public]\naddress = "127.0.0.1:{port}"\nroot-certificates = "{c.ca_cert}"\n')
        refused = fed.flwr("supernode", "list", "public")
        assert refused.returncode != 0, refused.stdout
        assert "403" in refused.stdout + refused.stderr or "Forbidden" in refused.stdout + refused.stderr
        listed = fed.flwr("supernode", "list", "fedslm")
        assert listed.returncode == 0, listed.stdout + listed.stderr

        key, pub = make_node_keys(fed.root / "certs", "site-public")
        registered = fed.flwr("supernode", "register", str(pub), "fedslm")
        assert "registered successfully" in registered.stdout
        node = fed.start_node(0, key=key, name="through-proxy", superlink=f"127.0.0.1:{port}")
        wait_for(lambda: "SuperNode ID" in node.text(), 60, "the site to connect through the proxy", node)
        assert "/v1/fleet/activate-node" in (prefix / "access.log").read_text()
    finally:
        if node is not None:
            node.kill()
        os.killpg(nginx.pid, 9)
        nginx.wait()
