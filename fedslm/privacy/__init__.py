"""Differential privacy, shared by the coordinator and every site.

- `accounting`: noise calibration for the whole run, the accountant's ledger, the budget;
- `plan`: one site's DP plan, or a refusal naming the data it would need;
- `dp_step`: the DP step of the training loop, wired through Opacus;
- `client_level`: site-level DP through Flower's server-side wrappers, and its epsilon;
- `report`: the guarantee as privacy.json and as the model card states it;
- `audit`: empirical evidence (canaries, membership inference, an epsilon lower bound).
"""
