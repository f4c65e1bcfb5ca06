"""A whole federation through Flower's simulation engine (Ray) with a tiny model: the one
end-to-end run of the real engine, attached to a Ray cluster started apart from it
(federation.ray_address) as a multi-node deployment would be; tests/test_federation.py
runs the other federations with the sites in-process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from simulations.simulate import simulate
from fedslm.transport import record_bytes, to_record

REQUIRED = {"rounds", "sites", "strategy", "eval_loss_initial", "eval_loss_final", "epsilon", "delta",
            "target_epsilon", "bytes_up", "bytes_down", "seconds"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_cluster():
    """`ray start --head` on 127.0.0.1 (2 CPUs) as its own process group, stopped afterwards."""
    port = _free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
                             "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2", "--num-gpus=0",
                             "--include-dashboard=false", "--disable-usage-stats",
                             f"--temp-dir={os.path.join(tempfile.gettempdir(), 'ray')}"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 90
    while True:
        if proc.poll() is not None:
            pytest.fail(f"ray start exited with {proc.returncode}: {proc.stdout.read()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        if time.time() > deadline:
            pytest.fail("ray start --head did not listen within 90 s")
        time.sleep(0.5)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


@pytest.mark.slow
def test_three_sites_two_rounds_end_to_end(tiny_cfg, ray_cluster, capfd):
    tiny_cfg.federation.sites = 3
    tiny_cfg.federation.rounds = 2
    tiny_cfg.federation.ray_address = ray_cluster  # the cluster's 2 CPUs, not a private Ray
    tiny_cfg.train.threads = 1
    tiny_cfg.server_eval.task = "perplexity"  # the server scores the sites' held-out rows too
    lines: list[str] = []
    summary = simulate(tiny_cfg, echo=lines.append)
    run = Path(tiny_cfg.output_dir)
    assert f"ray: attaching to the cluster at {ray_cluster}" in lines
    # the quiet console (verbose=false): the round table, none of the sites' own output,
    # which is in run.log instead
    console = capfd.readouterr()
    assert "round 2/2" in console.out and "ClientAppActor" not in console.out + console.err
    assert "train loss" not in console.out + console.err and "Manually terminating" not in console.err
    site_log = (Path(tiny_cfg.output_dir) / "run.log").read_text()
    assert all(f"site {s} round 2: train loss" in site_log for s in range(3))
    assert not (Path(tiny_cfg.output_dir) / ".live").exists()  # the sites' live status is not an output

    on_disk = json.loads((run / "summary.json").read_text())
    assert REQUIRED <= set(on_disk)
    assert on_disk["rounds"] == 2 and on_disk["sites"] == 3 and on_disk["strategy"] == "ffa"
    assert 0 < on_disk["epsilon"] <= tiny_cfg.privacy.epsilon
    assert on_disk["eval_loss_final"] < on_disk["eval_loss_initial"]
    assert summary["federation_seconds"] > 0
    server = on_disk["server_eval_per_round"]
    assert sorted(server) == ["0", "1", "2"] and server["0"]["server_examples"] == 3 * tiny_cfg.data.eval_examples
    assert server["2"]["server_loss"] < server["0"]["server_loss"]

    # bytes on the wire: B matrices only, in the transport dtype, once per site per message
    # each round's file is the global in peft form (A and B); only B crosses the wire
    r1 = load_file(str(run / "adapters" / "round_001.safetensors"))
    b1 = {k: v for k, v in r1.items() if ".lora_B." in k}
    wire = tiny_cfg.federation.transport_dtype
    size = 2 if wire == "float16" else 4
    adapter_bytes = record_bytes(to_record(b1, wire))
    assert sum(t.numel() * size for t in b1.values()) <= adapter_bytes <= sum(t.numel() * size + 256 for t in b1.values())
    assert on_disk["bytes_up"] == 2 * 3 * adapter_bytes
    assert on_disk["bytes_down"] == (3 + 2 * 2 * 3) * adapter_bytes  # round-0 eval, then train+eval

    r2 = load_file(str(run / "adapters" / "round_002.safetensors"))
    assert set(r2) == set(r1) and len(b1) * 2 == len(r2)
    assert all(torch.equal(r1[k], r2[k]) for k in r1 if ".lora_A." in k)  # FFA: A never moves
    assert any(r2[k].abs().max() > 0 for k in b1)  # the global B moved from zero
    assert any(not torch.equal(r1[k], r2[k]) for k in b1)
    assert len(on_disk["aggregation_error_per_round"]) == 2 and max(on_disk["aggregation_error_per_round"]) < 1e-6

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 3 and {(r["round"], r["site"]) for r in rows} == {(r, s) for r in (1, 2) for s in range(3)}
    assert (run / "curves.png").stat().st_size > 1000
    privacy = json.loads((run / "privacy.json").read_text())
    assert privacy["level"] == "sample" and set(privacy["epsilon_per_site"]) == {"0", "1", "2"}
    # what the sites released, exactly: the reply keys, and one held-out loss per site and
    # evaluation (round 0 and 2 rounds), named outside the guarantee on the model card too
    released = privacy["released"]
    assert released["train_reply_keys"] == ["site", "lora_r", "a_digest", "epsilon", "epsilon_rdp", "epsilon_prv",
                                            "epsilon_lifetime", "noise_multiplier", "sample_rate", "steps", "steps_total"]
    assert released["held_out_losses_per_site"] == {"0": 3, "1": 3, "2": 3}
    card = (run / "model" / "README.md").read_text()
    assert "Held-out losses released per site: {'0': 3, '1': 3, '2': 3}" in card and "against the coordinator" in card
    assert not any("train_loss" in r and r["train_loss"] is not None for r in rows)  # stays at the site

    model = AutoModelForCausalLM.from_pretrained(run / "model")
    assert model.config.eos_token_id == model.config.pad_token_id

    # the cluster outlives the run: another driver still finds it, with its 2 CPUs
    probe = subprocess.run([sys.executable, "-c", f"import ray; ray.init(address='{ray_cluster}', logging_level='ERROR');"
                            "print(int(ray.cluster_resources()['CPU'])); ray.shutdown()"],
                           capture_output=True, text=True, timeout=120)
    assert probe.stdout.strip().splitlines()[-1:] == ["2"], probe.stderr[-2000:]
