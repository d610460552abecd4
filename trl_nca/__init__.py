"""NCA and InfoNCA (Chen et al., NeurIPS 2024) for TRL: drop-in DPOTrainer subclasses for K scored responses.

The names below are imported on first use (as TRL's own package does), so that `import trl_nca` and the `trl-nca`
command's `--help` load neither torch nor transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_getattr

__version__ = "0.1.0"

# Each public name -> the module that defines it
_EXPORTS = {
    "NCAConfig": "config",
    "LAYOUTS": "data",
    "convert_to_k_responses": "data",
    "detect_layout": "data",
    "to_k_responses": "data",
    "build_reward_dataset": "generation",
    "PromptSharingGRPOTrainer": "group_forward",
    "DataCollatorForKResponses": "layouts",
    "DataCollatorForPromptCache": "layouts",
    "DataCollatorForSharedPrompt": "layouts",
    "infonca_loss": "losses",
    "nca_loss": "losses",
    "soft_labels": "losses",
    "OnlineNCAConfig": "online_config",
    "OnlineInfoNCATrainer": "online_trainer",
    "OnlineNCATrainer": "online_trainer",
    "InfoNCATrainer": "trainer",
    "NCATrainer": "trainer",
}

__all__ = [
    "LAYOUTS",
    "DataCollatorForKResponses",
    "DataCollatorForPromptCache",
    "DataCollatorForSharedPrompt",
    "InfoNCATrainer",
    "NCAConfig",
    "NCATrainer",
    "OnlineInfoNCATrainer",
    "OnlineNCAConfig",
    "OnlineNCATrainer",
    "PromptSharingGRPOTrainer",
    "build_reward_dataset",
    "convert_to_k_responses",
    "detect_layout",
    "infonca_loss",
    "nca_loss",
    "soft_labels",
    "to_k_responses",
]

if TYPE_CHECKING:
    from .config import NCAConfig
    from .data import LAYOUTS, convert_to_k_responses, detect_layout, to_k_responses
    from .generation import build_reward_dataset
    from .group_forward import PromptSharingGRPOTrainer
    from .layouts import DataCollatorForKResponses, DataCollatorForPromptCache, DataCollatorForSharedPrompt
    from .losses import infonca_loss, nca_loss, soft_labels
    from .online_config import OnlineNCAConfig
    from .online_trainer import OnlineInfoNCATrainer, OnlineNCATrainer
    from .trainer import InfoNCATrainer, NCATrainer


__getattr__ = lazy_getattr(__name__, globals(), _EXPORTS)


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
