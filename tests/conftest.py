"""Shared fixtures: a tiny random Llama (no downloads) and a run config composed from the
shipped conf/ (model=tiny), so what the tests train is what the product ships."""

from __future__ import annotations

import copy
import os

import pytest
import torch

os.environ.setdefault("FEDSLM_NO_PROGRESS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fedslm import quiet  # noqa: E402
from fedslm.config import RunConfig  # noqa: E402

quiet.silence_known_noise()
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("model-cache"))


@pytest.fixture(scope="session")
def shipped_tiny_cfg() -> RunConfig:
    """`python -m simulations.run model=tiny` as composed from conf/ (composed once)."""
    from fedslm.config.compose import compose_run_config

    return compose_run_config(["model=tiny"])


@pytest.fixture
def tiny_cfg(shipped_tiny_cfg, model_cache, tmp_path) -> RunConfig:
    """The shipped tiny-model run, sized down for a test."""
    cfg = copy.deepcopy(shipped_tiny_cfg)
    cfg.model.cache_dir = model_cache
    cfg.data.train_examples = 48
    cfg.data.eval_examples = 6
    cfg.train.batch_size = 4
    cfg.train.threads = 0
    cfg.train.progress = False
    cfg.federation.rounds = 2
    cfg.output_dir = str(tmp_path / "run")
    cfg.demo_answer = False
    cfg.tracking = "none"  # tests/test_report.py checks the tracker
    return cfg


@pytest.fixture
def flower_identity():
    """Messages built outside a Flower process need the task identity set."""
    from flwr.supercore.task_identity import TaskIdentity

    old = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = old


@pytest.fixture
def reproducible_dp():
    """Tests that compare two private runs need the same DP draws in both: the test-only
    switch of fedslm.privacy.randomness (no config key, node config or message reaches it)."""
    from fedslm.privacy.randomness import reproducible_for_tests

    with reproducible_for_tests():
        yield


@pytest.fixture
def publisher(tmp_path):
    """A publisher's key pair and the trusted-entities file a site keeps for it:
    (private key path, trusted-entities path, key id)."""
    from fedslm.deploy.certs import make_publisher_key
    from fedslm.deploy.signing import trusted_entity

    private, public = make_publisher_key(tmp_path)
    kid, line = trusted_entity(public)
    trusted = tmp_path / "trusted.yaml"
    trusted.write_text(f'{kid}: "{line}"\n')
    return private, trusted, kid
