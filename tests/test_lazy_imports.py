"""A deployed site starts a fresh ClientApp process for every message: importing the app
must not pay for what only training or accounting needs (Opacus, scipy's stats through
its accountants, flwr-datasets' partitioners and matplotlib)."""

from __future__ import annotations

import subprocess
import sys


def test_client_app_import_leaves_training_only_modules_out():
    code = (
        "import sys, client.app\n"
        "heavy = [m for m in ('opacus', 'flwr_datasets', 'matplotlib', 'scipy.stats') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_rdp_orders_extend_opacus_defaults():
    from opacus.accountants import RDPAccountant

    from fedslm.privacy.accounting import RDP_ALPHAS

    n = len(RDPAccountant.DEFAULT_ALPHAS)
    assert RDP_ALPHAS[:n] == list(RDPAccountant.DEFAULT_ALPHAS)
    assert RDP_ALPHAS[n:] == list(range(64, 257, 4))


def test_a_private_sites_evaluate_message_leaves_opacus_out(tmp_path):
    """With DP on (the default), an evaluate message (its own process in deployment) loads
    the model and scores the held-out rows without importing Opacus or its accountants."""
    code = (
        "import sys, copy\n"
        "from tests.conftest import *\n"
        "from fedslm.config.compose import compose_run_config\n"
        "from flwr.app import ConfigRecord, Context, Message, RecordDict\n"
        "from flwr.supercore.task_identity import TaskIdentity\n"
        "from fedslm.site.handlers import handle_evaluate\n"
        "from fedslm.site.runtime import runtime_for\n"
        "from fedslm.transport import to_record\n"
        "TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 1, 1\n"
        "cfg = compose_run_config(['model=tiny'])\n"
        f"cfg.model.cache_dir = {str(tmp_path)!r}; cfg.output_dir = {str(tmp_path / 'run')!r}\n"
        "cfg.data.train_examples, cfg.data.eval_examples = 48, 6\n"
        "assert cfg.privacy.enabled\n"
        "g = runtime_for(cfg).scheme.initial_global()\n"
        "msg = Message(RecordDict({'arrays': to_record(g), 'config': ConfigRecord({'server-round': 1})}), "
        "dst_node_id=11, message_type='evaluate')\n"
        "ctx = Context(run_id=3, node_id=11, node_config={'partition-id': 0, 'num-partitions': 2}, "
        "state=RecordDict(), run_config={})\n"
        "reply = handle_evaluate(msg, ctx, cfg)\n"
        "print(sorted(reply.content.metric_records['metrics']))\n"
        "print([m for m in ('opacus', 'scipy.stats') if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-2] == "['eval_loss', 'site']" and lines[-1] == "[]"
