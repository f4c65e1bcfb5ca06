"""Sweeps you can read: `fedslm compare` over a sweep with done, failed, running and
missing jobs; a run's report.html from a real federation; the TensorBoard tracker read
back with TensorBoard's own reader; the report rendered by a real headless browser."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedslm.privacy.accounting import PrivacyLedger
from fedslm.report.compare import compare, compare_command, format_table
from simulations.inprocess import run_in_process


def _job(root: Path, i: int, overrides: list[str], eps: float | None, loss: float, accuracy: float | None,
         steps: int = 9) -> Path:
    job = root / str(i)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides + [f"output_dir={job}"]))
    flat = {"privacy.enabled": eps is not None, "federation.rounds": 3, "output_dir": str(job)}
    (job / "run_config.json").write_text(json.dumps(flat))
    if loss is None:
        return job
    summary = {"rounds": 3, "sites": 2, "eval_loss_final": loss, "epsilon": eps, "bytes_up": 3_000_000,
               "bytes_down": 6_000_000, "federation_seconds": 42.0, "privacy": "sample" if eps else "none",
               "server_eval_per_round": {"3": {"server_accuracy": accuracy}} if accuracy is not None else {}}
    (job / "summary.json").write_text(json.dumps(summary))
    if eps is not None:
        sigma = 0.6 if eps > 4 else 1.4
        privacy = {"level": "sample", "delta": 1e-5, "accountant": "rdp", "epsilon_per_site": {"0": eps, "1": eps},
                   "noise_multiplier_per_site": {"0": sigma, "1": sigma}, "sample_rate_per_site": {"0": 0.02, "1": 0.02},
                   "steps_per_site": {"0": steps, "1": steps}}
    else:
        privacy = {"level": "none"}
    (job / "privacy.json").write_text(json.dumps(privacy))
    return job


@pytest.fixture
def sweep(tmp_path) -> Path:
    """multirun/DATE/TIME of `-m privacy.epsilon=2,8 strategy=ffa,fedavg` plus a non-private
    job: two done, one failed an hour ago, one still running, one not started."""
    root = tmp_path / "multirun" / "2026-12-04" / "10-00-00"
    root.mkdir(parents=True)
    (root / "multirun.yaml").write_text("hydra:\n  overrides:\n    task:\n    - privacy.epsilon=2,8\n"
                                        "    - strategy=ffa,fedavg,none_dp\n")
    _job(root, 0, ["privacy.epsilon=2", "strategy=ffa"], 2.0, 3.1, 0.41)
    _job(root, 1, ["privacy.epsilon=8", "strategy=ffa"], 8.0, 2.9, 0.55)
    failed = _job(root, 2, ["privacy.epsilon=2", "strategy=fedavg"], 2.0, None, None)
    (failed / "run.log").write_text("round 1 ...\nValueError: lora.r must be >= 1\n")
    quiet = _job(root, 6, ["privacy.epsilon=8", "strategy=none_dp"], 8.0, None, None)
    (quiet / "run.log").write_text("site 0 round 1: train loss 2.3456 over 8 examples\n")  # a site's own line
    old = time.time() - 3600
    for p in [failed, *failed.rglob("*"), quiet, *quiet.rglob("*")]:
        os.utime(p, (old, old))
    running = _job(root, 3, ["privacy.epsilon=8", "strategy=fedavg"], 8.0, None, None)  # started just now
    (running / "metrics.jsonl").write_text(json.dumps({"round": 1, "site": 0, "noise_multiplier": 0.6}) + "\n")
    (root / "1" / "report.html").write_text("<html></html>")
    _job(root, 4, ["privacy=none", "strategy=ffa"], None, 2.5, 0.70)
    return root


def test_compare_lists_every_job_with_its_state_and_the_sweeps_privacy(sweep, capsys):
    c = compare_command([sweep])
    by_job = {r["job"]: r for r in c.rows}
    assert [r["status"] for r in c.rows] == ["done", "done", "done", "running", "failed", "failed", "missing"]
    assert set(by_job) == {"0", "1", "2", "3", "4", "5", "6"} and by_job["5"]["status"] == "missing"  # 2 x 3 jobs
    # a job not started yet shows what it will run: Hydra's product of the task overrides, in order
    assert (by_job["5"]["privacy.epsilon"], by_job["5"]["strategy"]) == ("8", "none_dp")
    assert "train loss" not in by_job["6"]["note"]  # a quiet run's log holds the sites' lines: never quoted
    assert {"privacy.epsilon", "strategy", "privacy"} <= set(c.varied)
    assert c.utility == "server accuracy" and c.higher_is_better
    assert by_job["1"]["epsilon"] == 8.0 and by_job["1"]["server accuracy"] == 0.55 and by_job["1"]["MB/round"] == 3.0
    assert by_job["4"]["epsilon"] is None  # the non-private job
    assert "lora.r must be >= 1" in by_job["2"]["note"]
    # the sweep's privacy per site: both done private jobs' steps composed, more than either alone
    both = PrivacyLedger([(1.4, 0.02, 9), (0.6, 0.02, 9)]).epsilon(1e-5, "rdp")
    assert c.sweep_epsilon == {"0": pytest.approx(both), "1": pytest.approx(both)}
    assert both > PrivacyLedger([(0.6, 0.02, 9)]).epsilon(1e-5, "rdp")
    out = capsys.readouterr().out
    assert "3 done, 1 running, 2 failed, 1 missing" in out and f"site 0 {both:.2f}" in out
    assert c.uncounted == ["3"] and "a lower bound: not counted 3" in out  # it trained a round already
    csv_lines = (sweep / "compare.csv").read_text().splitlines()
    assert csv_lines[0].startswith("job,status,") and len(csv_lines) == 8
    assert (sweep / "frontier.png").stat().st_size > 5000
    page = (sweep / "report.html").read_text()
    assert "data:image/png;base64," in page and "status-failed" in page and "over the sweep" in page
    assert "http" not in page.replace("http-equiv", "")  # nothing fetched from anywhere
    assert '<a href="1/report.html">' in page  # relative to the sweep's page


def test_compare_of_a_sweep_that_has_not_finished_anything(tmp_path):
    root = tmp_path / "sweep"
    root.mkdir()
    (root / "multirun.yaml").write_text("hydra:\n  overrides:\n    task:\n    - privacy.epsilon=1,4\n")
    _job(root, 0, ["privacy.epsilon=1"], 1.0, None, None)
    c = compare_command([root], echo=lambda *_: None)
    assert [r["status"] for r in c.rows] == ["running", "missing"]
    assert not (root / "frontier.png").exists() and (root / "report.html").is_file()
    assert "1 running, 1 missing" in format_table(c)


def test_compare_says_what_is_wrong_with_its_arguments(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fedslm.cli", "compare", str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no such directory" in proc.stderr
    (tmp_path / "empty").mkdir()
    assert compare.__name__  # the library call raises the same
    with pytest.raises(FileNotFoundError, match="holds no fedslm run"):
        compare([tmp_path / "empty"])


def test_a_run_writes_its_report_and_tensorboard_events(tiny_cfg):
    tiny_cfg.federation.sites, tiny_cfg.federation.rounds = 2, 2
    tiny_cfg.tracking = "tensorboard"
    tiny_cfg.lora.r = 4
    run_in_process(tiny_cfg)
    run = Path(tiny_cfg.output_dir)
    page = (run / "report.html").read_text()
    for text in ("Configuration (what differs from the defaults)", "<td>lora.r</td><td class=\"num\">4</td>",
                 "<h2>Sites</h2>", "Loss and epsilon per round, per site", "Bytes and time per round",
                 "sample-level", "Rejected replies", "<p>None.</p>"):
        assert text in page, text
    assert page.count("data:image/png;base64,") == 2 and "<script" not in page
    summary = json.loads((run / "summary.json").read_text())
    final = summary["eval_loss_per_site"]["1"]["2"]
    assert f'<td class="num">{final:.4g}</td>' in page  # the per-site table holds site 1's final loss

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"eval_loss/site_0", "eval_loss/site_1", "epsilon/site_0", "round/seconds"} <= set(tags["scalars"])
    assert [e.step for e in acc.Scalars("eval_loss/site_0")] == [0, 1, 2]
    eps = [e.value for e in acc.Scalars("epsilon/site_1")]
    assert eps == pytest.approx(sorted(eps)) and 0 < eps[-1] <= tiny_cfg.privacy.epsilon
    assert "model card/text_summary" in tags["tensors"] and "curves" in tags["images"]
    # the HParams tab: this run's settings that differ from the defaults, and its final figures
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["lora.r"].number_value == 4 and start.hparams["model.source"].string_value == "tiny"
    assert acc.Scalars("final/eval_loss_final")[-1].value == pytest.approx(summary["eval_loss_final"])


@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")),
                    reason="no headless browser (Debian: apt-get install chromium)")
def test_the_report_renders_in_a_headless_browser(sweep, tmp_path):
    compare_command([sweep], echo=lambda *_: None)
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    shot = tmp_path / "report.png"
    proc = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1200,1600",
                           f"--screenshot={shot}", "--enable-logging=stderr", "--v=0",
                           (sweep / "report.html").as_uri()], capture_output=True, text=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 20000, proc.stderr[-2000:]
    assert "Uncaught" not in proc.stderr and "ERR_" not in proc.stderr
    # the frontier image decoded and laid out: the screenshot holds its colours, not just text
    from PIL import Image

    colours = Image.open(shot).convert("RGB").getcolors(maxcolors=1_000_000)
    assert colours is not None and len(colours) > 200


def test_the_live_console_prints_lines_above_one_live_line_per_site(tmp_path):
    import io

    from simulations.console import LiveConsole

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    live = tmp_path / ".live"
    live.mkdir()
    (live / "site-0.json").write_text(json.dumps({"site": 0, "round": 2, "phase": "training", "step": 3, "steps": 9,
                                                  "loss": 2.3456}))
    (live / "site-1.json").write_text(json.dumps({"site": 1, "round": 1, "phase": "trained", "epsilon": 6.5}))
    term = Terminal()
    before = sys.stdout
    with LiveConsole(tmp_path, stream=term, interval_s=60) as console:
        assert sys.stdout is console
        print("round 1/3     4.0s  up 0.01 MB")
        print("round 2/3 ...", end="")  # an unfinished line waits for its end
        shown = term.getvalue()
    assert sys.stdout is before
    assert shown.startswith("round 1/3     4.0s  up 0.01 MB\n")
    assert "site 0  round 2  training  step 3/9  loss 2.346" in shown and "site 1  round 1  trained  epsilon 6.50" in shown
    assert "round 2/3" not in shown and term.getvalue().count("round 2/3 ...") == 1  # written at the end
    # piped output (CI, a file) gets the lines alone, never the live block
    piped = io.StringIO()
    with LiveConsole(tmp_path, stream=piped):
        print("round 1/3")
    assert piped.getvalue() == "round 1/3\n"
