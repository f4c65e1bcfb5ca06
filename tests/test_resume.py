"""A coordinator that dies after a round and is restarted with resume=true ends with the
same global adapter as a run that never stopped (the real server run with in-process
sites; the deployment test kills a real SuperLink)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedslm.server import checkpoint as resume
from fedslm.config import ConfigError, validate
from simulations.inprocess import run_in_process


class CoordinatorCrash(RuntimeError):
    pass


def _cfg(tiny_cfg, out: Path):
    cfg = copy.deepcopy(tiny_cfg)
    cfg.federation.sites, cfg.federation.rounds = 2, 2
    cfg.train.local_steps = 2
    # FedAdam's m_t, v_t and bias correction (which counts rounds) must survive the restart
    cfg.strategy.server_optimizer, cfg.strategy.server_lr = "fedadam", 0.01
    cfg.export_model = False
    cfg.output_dir = str(out)
    return cfg


def _final(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapters" / "round_002.safetensors"))


def test_resume_after_a_coordinator_crash_matches_an_uninterrupted_run(tiny_cfg, tmp_path, monkeypatch, capsys,
                                                                       reproducible_dp):
    full = _cfg(tiny_cfg, tmp_path / "full")
    run_in_process(full)

    crashed = _cfg(tiny_cfg, tmp_path / "crashed")
    save = resume.save

    def save_then_die(run_dir, server_round, *args):
        save(run_dir, server_round, *args)
        if server_round == 1:
            raise CoordinatorCrash("coordinator killed after round 1")

    monkeypatch.setattr(resume, "save", save_then_die)
    with pytest.raises(CoordinatorCrash):
        run_in_process(crashed)
    monkeypatch.setattr(resume, "save", save)
    run = Path(crashed.output_dir)
    assert resume.Checkpoint.load(run).server_round == 1
    assert not (run / "adapters" / "round_002.safetensors").exists()

    capsys.readouterr()
    crashed.resume = True
    summary = run_in_process(crashed, echo=print)
    out = capsys.readouterr().out
    assert f"resuming {run} after round 1/2" in out and "round 0 (base model)" not in out

    a, b = _final(Path(full.output_dir)), _final(run)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    ref = json.loads((Path(full.output_dir) / "summary.json").read_text())
    # the record spans both rounds, and epsilon continues the same ledgers
    assert summary["rounds"] == 2 and summary["epsilon"] == pytest.approx(ref["epsilon"])
    assert summary["eval_loss_initial"] == pytest.approx(ref["eval_loss_initial"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sorted((r["round"], r["site"]) for r in rows) == [(r, s) for r in (1, 2) for s in (0, 1)]


def test_resume_refuses_a_missing_checkpoint_and_a_changed_config(tiny_cfg, tmp_path):
    from fedslm.server.run import checkpoint_to_resume as _checkpoint_to_resume

    cfg = _cfg(tiny_cfg, tmp_path / "run")
    cfg.resume = True
    with pytest.raises(FileNotFoundError, match="no round of this run was saved"):
        _checkpoint_to_resume(cfg, Path(cfg.output_dir))

    resume.save(Path(cfg.output_dir), 1, "k", {"x": torch.zeros(2)}, {})
    from fedslm.config import to_run_config

    saved = to_run_config(cfg)
    saved["train.lr"] = 0.5
    (Path(cfg.output_dir) / "run_config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"train.lr \(saved 0.5"):
        _checkpoint_to_resume(cfg, Path(cfg.output_dir))
    # how many sites to wait for is operational and may change (wait for all after a
    # restart); what is trained and what is noised may not
    saved["train.lr"] = cfg.train.lr
    saved["federation.min_sites"] = cfg.federation.min_sites + 1
    (Path(cfg.output_dir) / "run_config.json").write_text(json.dumps(saved))
    assert _checkpoint_to_resume(cfg, Path(cfg.output_dir)).server_round == 1
    saved["privacy.epsilon"] = 0.5
    (Path(cfg.output_dir) / "run_config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"privacy.epsilon \(saved 0.5"):
        _checkpoint_to_resume(cfg, Path(cfg.output_dir))

    cfg.output_dir = ""
    with pytest.raises(ConfigError, match="resume: needs output_dir"):
        validate(cfg)


def test_optimizer_state_round_trips_through_the_checkpoint_files(tmp_path):
    """FedAdam's dicts, FedAvgM's record and list, and a DP wrapper's clip norm, saved as
    checkpoint parts to disk and loaded into fresh objects, come back equal and in their
    own dtypes (float64 moments stay float64)."""
    import numpy as np
    from flwr.app import Array, ArrayRecord

    from fedslm.server.strategy import WrapperState

    class Optimiser:
        def __init__(self):
            self.m_t = {"a": np.arange(3.0)}
            self.v_t = {"a": np.ones(3)}
            self.current_arrays = ArrayRecord({"a": Array(np.arange(3, dtype=np.float32))})
            self.momentum_vector = [np.full(2, 0.5)]

    class DPWrapper:
        clipping_norm = 0.25

    saved_opt, saved_dp = Optimiser(), DPWrapper()
    resume.save(tmp_path, 3, "key", {"w": torch.ones(2, dtype=torch.float64)},
                {"strategy": WrapperState(saved_opt), "client_dp": WrapperState(saved_dp)})

    fresh_opt, fresh_dp = type("Empty", (), {})(), DPWrapper()
    fresh_dp.clipping_norm = 1.0
    ckpt = resume.Checkpoint.load(tmp_path)
    arrays = ckpt.restore({"strategy": WrapperState(fresh_opt), "client_dp": WrapperState(fresh_dp)})
    assert (ckpt.server_round, ckpt.run_key) == (3, "key")
    assert arrays["w"].numpy().dtype == np.float64
    assert np.array_equal(fresh_opt.m_t["a"], np.arange(3.0)) and fresh_opt.m_t["a"].dtype == np.float64
    assert np.array_equal(fresh_opt.v_t["a"], np.ones(3))
    assert np.array_equal(fresh_opt.current_arrays["a"].numpy(), np.arange(3, dtype=np.float32))
    assert np.array_equal(fresh_opt.momentum_vector[0], np.full(2, 0.5))
    assert fresh_dp.clipping_norm == 0.25


class _Part:
    def __init__(self, value: float):
        self.value = value

    def state_dict(self) -> dict:
        return {"m": torch.full((3,), self.value)}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["m"][0])


def test_a_crash_while_saving_leaves_the_previous_round_whole(tmp_path, monkeypatch):
    """Round 2's arrays written and its state not: the old layout paired them; now
    `latest` still names round 1, whose arrays and state belong together."""
    resume.save(tmp_path, 1, "k", {"g": torch.ones(2)}, {"opt": _Part(1.0)})
    real = resume.save_file

    def die_on_state(tensors, path, *a, **k):
        if path.endswith("state.safetensors"):
            raise OSError("disk full")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(resume, "save_file", die_on_state)
    with pytest.raises(OSError, match="disk full"):
        resume.save(tmp_path, 2, "k", {"g": torch.full((2,), 2.0)}, {"opt": _Part(2.0)})
    monkeypatch.setattr(resume, "save_file", real)
    ck = resume.Checkpoint.load(tmp_path)
    part = _Part(0.0)
    arrays = ck.restore({"opt": part})
    assert ck.server_round == 1 and part.value == 1.0 and float(arrays["g"].numpy()[0]) == 1.0
    # the next complete save moves the pointer; older rounds than the one before are dropped
    resume.save(tmp_path, 2, "k", {"g": torch.full((2,), 2.0)}, {"opt": _Part(2.0)})
    resume.save(tmp_path, 3, "k", {"g": torch.full((2,), 3.0)}, {"opt": _Part(3.0)})
    assert resume.Checkpoint.load(tmp_path).server_round == 3
    assert sorted(p.name for p in (tmp_path / "checkpoint").glob("round-*")) == ["round-0002", "round-0003"]
