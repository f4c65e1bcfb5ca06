"""DP randomness is secret: the coordinator holds the run config, the exported model's
config and every message, and still cannot regenerate the noise or the Poisson batches."""

from __future__ import annotations

import itertools

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedslm.config import to_run_config
from fedslm.privacy.randomness import DPRandomness, entropy_generator
from fedslm.site.handlers import handle_train
from fedslm.site.runtime import runtime_for
from fedslm.transport import to_record

_RUN_IDS = itertools.count(5000)


def _round(cfg, tmp_path, site=0, server_round=1):
    """One private round at a fresh site (new process, new disk); the noise Opacus adds is recorded."""
    from opacus.optimizers import optimizer as opacus_optimizer

    g = {k: torch.zeros_like(v) if ".lora_B." in k else v
         for k, v in runtime_for(cfg).scheme.initial_global().items()}
    msg = Message(RecordDict({"arrays": to_record(g), "config": ConfigRecord({"server-round": server_round})}),
                  dst_node_id=11, message_type="train")
    ctx = Context(run_id=next(_RUN_IDS), node_id=11, state=RecordDict(), run_config={},
                  node_config={"partition-id": site, "num-partitions": 3, "state-dir": str(tmp_path / f"s{next(_RUN_IDS)}")})
    noises, real = [], opacus_optimizer._generate_noise

    def spy(*args, **kwargs):
        noises.append(real(*args, **kwargs))
        return noises[-1]

    opacus_optimizer._generate_noise = spy
    try:
        reply = handle_train(msg, ctx, cfg, progress=False)
    finally:
        opacus_optimizer._generate_noise = real
    return reply.content, noises


def test_two_identical_runs_add_different_noise_and_draw_different_batches(tiny_cfg, tmp_path, flower_identity):
    tiny_cfg.train.local_steps = 2
    a, noise_a = _round(tiny_cfg, tmp_path)
    b, noise_b = _round(tiny_cfg, tmp_path)
    assert noise_a and len(noise_a) == len(noise_b)
    for x, y in zip(noise_a, noise_b):
        assert x.std() > 0 and not torch.equal(x, y)
        assert abs(float(torch.corrcoef(torch.stack([x.flatten(), y.flatten()]))[0, 1])) < 0.2
    assert any(arr.data != b["arrays"][k].data for k, arr in a["arrays"].items())
    # without DP the same config trains the same round: the difference above is the DP draws
    tiny_cfg.privacy.enabled = False
    c, _ = _round(tiny_cfg, tmp_path)
    d, _ = _round(tiny_cfg, tmp_path)
    assert all(arr.data == d["arrays"][k].data for k, arr in c["arrays"].items())


def test_the_noise_cannot_be_regenerated_from_the_run_config_or_the_messages(tiny_cfg, tmp_path, flower_identity):
    """The attack that worked before: seed a generator from any integer the coordinator
    knows (the run config's seed, the site, the round and what was derived from them) and
    compare its Gaussian draws with the noise the site added."""
    tiny_cfg.train.local_steps = 1
    reply, noises = _round(tiny_cfg, tmp_path, site=1, server_round=2)
    run_config = to_run_config(tiny_cfg)
    public = {int(v) for v in run_config.values() if isinstance(v, (int, float)) and float(v).is_integer()}
    public |= {1, 2, reply.metric_records["metrics"]["site"]}
    derived = {hash((tiny_cfg.seed, 1, 2)) % (2**31)}
    candidates = {c + k for c in public | derived for k in (0, 1, 2)}
    std = float(noises[0].std())
    for noise in noises:
        for seed in candidates:
            g = torch.Generator().manual_seed(seed)
            plain = torch.normal(0, std, size=noise.shape, generator=g)
            g = torch.Generator().manual_seed(seed)
            torch.normal(0, std, size=(1, 1), generator=g)  # Opacus's secure sampling discards one draw
            summed = sum(torch.normal(0, std, size=noise.shape, generator=g) for _ in range(4)) / 2
            for guess in (plain, summed):
                assert float((guess - noise).abs().max()) > std  # nowhere near: not the same draws
    # and nothing the site wrote or sent holds the generator's state or a seed for it
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written and not any("seed" in p.read_text(errors="ignore").lower() for p in written if p.suffix == ".json")
    assert not {"seed", "noise_seed"} & set(reply.metric_records["metrics"])


def test_entropy_generators_are_independent_and_gaussian():
    a, b = entropy_generator(), entropy_generator()
    x, y = torch.randn(200_000, generator=a), torch.randn(200_000, generator=b)
    assert not torch.equal(x, y)
    assert abs(float(x.mean())) < 0.01 and abs(float(x.std()) - 1) < 0.01
    assert abs(float(torch.corrcoef(torch.stack([x, y]))[0, 1])) < 0.01
    # the test-only switch is off unless a test turns it on
    assert not torch.equal(torch.rand(8, generator=DPRandomness.secret(3).noise),
                           torch.rand(8, generator=DPRandomness.secret(3).noise))


def test_the_test_switch_reproduces_and_no_config_key_reaches_it(tiny_cfg):
    from fedslm.config.flat import to_run_config as flat
    from fedslm.privacy.randomness import reproducible_for_tests

    with reproducible_for_tests():
        assert torch.equal(torch.rand(8, generator=DPRandomness.secret(3).noise),
                           torch.rand(8, generator=DPRandomness.secret(3).noise))
    assert not any("reproducib" in k or "secure" in k or "noise_seed" in k for k in flat(tiny_cfg))
