"""Learning from feedback after SFT: preference tuning (:mod:`jaxgpt.rl.dpo`) and RL on verifiable rewards
(:mod:`jaxgpt.rl.grpo`, ``python -m jaxgpt.rl``)."""

from __future__ import annotations

from jaxgpt.rl.dpo import DPO
from jaxgpt.train.config import TrainConfig


def objective_for(config: TrainConfig) -> DPO | None:
    """The training objective ``--objective`` names (None: the next-token loss)."""
    return DPO(config.dpo_beta, config.dpo_sft_weight, config.dpo_loss) if config.objective == "dpo" else None
