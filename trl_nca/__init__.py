"""NCA and InfoNCA (Chen et al., NeurIPS 2024) for TRL: drop-in DPOTrainer subclasses for K scored responses."""

from .config import NCAConfig
from .data import LAYOUTS, convert_to_k_responses, detect_layout, to_k_responses
from .generation import build_reward_dataset
from .group_forward import PromptSharingGRPOTrainer
from .layouts import DataCollatorForKResponses, DataCollatorForPromptCache, DataCollatorForSharedPrompt
from .losses import infonca_loss, nca_loss, soft_labels
from .online_config import OnlineNCAConfig
from .online_trainer import OnlineInfoNCATrainer, OnlineNCATrainer
from .trainer import InfoNCATrainer, NCATrainer

__version__ = "0.1.0"

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
