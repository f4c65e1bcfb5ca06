"""What a site releases to the coordinator, and under which guarantee (threat model, rule 1).

The site's handlers send exactly these keys; privacy.json and the model card list them
from here, so the disclosure and the replies cannot drift apart.
"""

from __future__ import annotations

# A private site's train reply, besides the adapter (covered by epsilon). The site id and
# rank are its node config; a_digest fingerprints the frozen A drawn from the public
# lora.init_seed; the run's accountant figures and step counts follow from the public run
# config and the site's training-set size. epsilon_lifetime also depends on the site's
# other runs on the same data: named in NOT_COVERED below.
DP_TRAIN_KEYS = ("site", "lora_r", "a_digest", "epsilon", "epsilon_rdp", "epsilon_prv", "epsilon_lifetime", "noise_multiplier",
                 "sample_rate", "steps", "steps_total")
# Without DP nothing is guaranteed, and the diagnostics go back too.
NON_DP_TRAIN_KEYS = DP_TRAIN_KEYS + ("num-examples", "train_loss", "truncated", "examples_seen", "train_seconds")
EVAL_KEYS = ("site", "eval_loss")

NOT_COVERED = {
    "training_set_size": "each site's number of training examples n, through sample_rate = 1 / ceil(n / batch_size) "
                         "and, with train.local_epochs, steps = ceil(epochs x n / batch_size) (the noise is "
                         "calibrated to it, as in Opacus); not covered by epsilon",
    "held_out_loss": "one mean answer loss on the site's held-out rows per evaluated round (counted per site in "
                     "held_out_losses_per_site); not covered by epsilon. A site's policy may decline (evaluate: false)",
    "participation": "which sites replied in which round, and when",
    "lifetime_epsilon": "epsilon_lifetime in each train reply: what the site's data set has spent over all its "
                        "runs, so how much it was used in other runs; about the data set, not any record",
    "error_replies": "a refused or failed message's reason: the setting and the site's limit, counts and "
                     "site-local file paths; never row values (a data error that would quote rows is sent without them)",
}


def released(train_metrics: dict[int, dict[int, dict]], eval_metrics: dict[int, dict[int, dict]], dp: bool) -> dict:
    """privacy.json's account of every value the sites sent."""
    evaluations: dict[str, int] = {}
    for per_site in eval_metrics.values():
        for site in per_site:
            evaluations[str(site)] = evaluations.get(str(site), 0) + 1
    return {
        "adapter_updates": "covered by the sample-level guarantee" if dp else "no guarantee (DP off)",
        "train_reply_keys": list(DP_TRAIN_KEYS if dp else NON_DP_TRAIN_KEYS),
        "eval_reply_keys": list(EVAL_KEYS),
        "held_out_losses_per_site": dict(sorted(evaluations.items())),
        "not_covered": NOT_COVERED if dp else {"everything": "DP was off"},
    }
