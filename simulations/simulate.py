"""Run a federation on this machine with Flower's simulation engine."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

from fedslm import quiet
from fedslm.config import RunConfig
from fedslm.device import DeviceError, check_hardware
from fedslm.data.sites import format_site_table, is_synthetic, site_table
from fedslm.model import resolve_model_dir
from fedslm.rundir import mark_run_dir
from fedslm.site.progress import LIVE_DIR
from fedslm.site.runtime import PREFIX_CACHE_DIR
from simulations.console import LiveConsole


class FederationFailed(RuntimeError):
    pass


def ray_backend(cfg: RunConfig) -> dict:
    """Flower's Ray backend config: each site process's CPUs and share of a GPU, and either
    a private Ray instance sized to this machine or an existing cluster."""
    fed = cfg.federation
    if fed.ray_address:
        # a running cluster brings its own resources; Ray refuses num_cpus from a driver
        # that connects to one
        init = {"address": fed.ray_address, "logging_level": "ERROR"}
    else:
        init = {"num_cpus": fed.ray_cpus or os.cpu_count() or 1, "include_dashboard": False, "logging_level": "ERROR"}
    # quiet (verbose=false): the sites' output stays out of the console (fedslm.site.progress
    # sends their lines to run.log); an actor's failure still reaches the driver as an error
    init["log_to_driver"] = cfg.verbose
    return {"client_resources": {"num_cpus": fed.cpus_per_site, "num_gpus": gpus_per_site(cfg)}, "init_args": init}


def gpus_per_site(cfg: RunConfig) -> float:
    """federation.gpus_per_site, or (auto) nothing without a GPU and otherwise a share that
    packs the site processes that run at once (Ray CPUs / CPUs per site) onto this machine's
    GPUs: 1 / ceil(at once / GPUs), so that Ray can place every one of them (2 GPUs, 3 sites:
    a half each, not 2/3, of which no GPU holds two)."""
    fed = cfg.federation
    if fed.gpus_per_site >= 0:
        return float(fed.gpus_per_site)
    from fedslm.device import resolve_device

    if resolve_device(cfg.train.device).type != "cuda":
        return 0.0
    import torch

    at_once = min(fed.sites, max(1, int((fed.ray_cpus or os.cpu_count() or 1) / fed.cpus_per_site)))
    return 1.0 / math.ceil(at_once / torch.cuda.device_count())


def simulate(cfg: RunConfig, echo=print) -> dict:
    quiet.silence_known_noise()
    # Ray's socket paths must stay short; the default temp dir under a deep cwd is not.
    os.environ.setdefault("RAY_TMPDIR", os.path.join(tempfile.gettempdir(), "ray"))
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")

    from flwr.simulation import run_simulation

    from client.app import build_client_app
    from server.app import build_server_app

    # Convert/build the base model once here, before any site process starts, so the
    # sites only ever read the safetensors cache.
    t0 = time.perf_counter()
    device = check_hardware(cfg.train.device, cfg.model.quantize)
    model_dir = resolve_model_dir(cfg.model)
    echo(f"base model: {model_dir} ({time.perf_counter() - t0:.1f}s to prepare); sites train on {device.type}")

    run_dir = Path(cfg.output_dir)
    mark_run_dir(run_dir)
    if cfg.privacy.ledger_dir:
        mark_run_dir(Path(cfg.privacy.ledger_dir))
    (run_dir / "summary.json").unlink(missing_ok=True)

    # the per-site table, from the same partitioning the sites will do themselves
    table = site_table(cfg.data, cfg.federation.sites)
    synthetic = is_synthetic(cfg.data)
    echo(f"data: {cfg.data.name} ({'built-in synthetic clinics' if synthetic else cfg.data.path or cfg.data.format}), "
         f"partitioner {'one clinic per site' if synthetic else cfg.data.partitioner}")
    echo(format_site_table(table))
    (run_dir / "sites.json").write_text(json.dumps(table, indent=2))
    fed = cfg.federation
    backend = ray_backend(cfg)
    if device.type == "cuda" and not backend["client_resources"]["num_gpus"]:
        raise DeviceError("federation.gpus_per_site=0 with sites on cuda: Ray hides the GPU from site processes that "
                          "reserve none, so every site would fail; set a share (0.25: four sites per GPU) or -1 (auto), "
                          "or train.device=cpu")
    if fed.ray_address:
        echo(f"ray: attaching to the cluster at {fed.ray_address}")
    if backend["client_resources"]["num_gpus"]:
        echo(f"sites on the GPU: {backend['client_resources']['num_gpus']:g} of a GPU per site process")
    start = time.perf_counter()
    console = nullcontext() if cfg.verbose else LiveConsole(run_dir)
    try:
        with console:
            run_simulation(
                server_app=build_server_app(cfg),
                client_app=build_client_app(cfg),
                num_supernodes=fed.sites,
                backend_config=backend,
            )
    finally:
        # the sites' frozen-prefix states (lora.layers) are rows of their data: not an output
        shutil.rmtree(run_dir / PREFIX_CACHE_DIR, ignore_errors=True)
        shutil.rmtree(run_dir / LIVE_DIR, ignore_errors=True)
    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
        raise FederationFailed(
            f"the federation ended without writing {summary_path}; the server or a site "
            "failed: see the error printed above"
        )
    summary = json.loads(summary_path.read_text())
    summary["federation_seconds"] = time.perf_counter() - start
    summary_path.write_text(json.dumps(summary, indent=2))
    return summary
