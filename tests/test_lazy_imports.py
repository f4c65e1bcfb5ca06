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
