"""fused_dpo: fused log-probabilities, DPO-family losses and a thin DPO trainer."""

__version__ = "0.1.0"

from .hidden import get_logps_from_hidden
from .logps import get_logps

__all__ = ["__version__", "get_logps", "get_logps_from_hidden"]
