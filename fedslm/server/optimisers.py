"""Server optimisers over the aggregated update: Flower's own FedAvgM, FedAdam and FedYogi.

A server optimiser is put in front of fedslm's strategy in the MRO: its aggregate_train
calls ours (the LoRA-aware mean), then steps the global adapter, so the update rule and
its state are Flower's. This module owns the list of names (`strategy.server_optimizer`).
"""

from __future__ import annotations

from fedslm.config import StrategyConfig

# strategy.server_optimizer -> the Flower strategy class (None: the aggregate is the new global)
SERVER_OPTIMISERS = {"none": None, "fedavgm": "FedAvgM", "fedadam": "FedAdam", "fedyogi": "FedYogi"}


def optimiser_class(name: str):
    """Flower's strategy class for `name`, or None for no server optimiser."""
    cls_name = SERVER_OPTIMISERS[name]
    if cls_name is None:
        return None
    import flwr.serverapp.strategy as flwr_strategies

    return getattr(flwr_strategies, cls_name)


def optimiser_kwargs(st: StrategyConfig) -> dict:
    """The constructor arguments the optimiser class takes beyond FedAvg's."""
    if st.server_optimizer == "fedavgm":
        return {"server_learning_rate": st.server_lr, "server_momentum": st.server_momentum}
    if st.server_optimizer in ("fedadam", "fedyogi"):
        return {"eta": st.server_lr, "beta_1": st.beta_1, "beta_2": st.beta_2, "tau": st.tau}
    return {}
