"""fused_dpo: fused log-probabilities, DPO-family losses and a thin DPO trainer."""

__version__ = "0.1.0"

from . import _requires  # noqa: F401  (first: an ImportError naming the torch it needs)
from ._common import LogpsStats
from .fused_loss import FusedDPOLoss, dpo_loss_from_hidden
from .hidden import get_logps_from_hidden
from .logps import get_logps
from .losses import BCOState, dpo_loss
from .rl import token_logps_and_entropy, token_logps_and_entropy_from_hidden

__all__ = [
    "__version__",
    "BCOState",
    "FusedDPOLoss",
    "dpo_loss",
    "dpo_loss_from_hidden",
    "get_logps",
    "get_logps_from_hidden",
    "LogpsStats",
    "token_logps_and_entropy",
    "token_logps_and_entropy_from_hidden",
]
