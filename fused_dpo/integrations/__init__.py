"""Drop-ins for other training libraries. Each lives in its own submodule and imports its library
only when that submodule is imported, so `import fused_dpo` never pulls them in:

- `fused_dpo.integrations.trl`: TRL 1.16's trainers (DPOTrainer, GRPOTrainer, and every trainer
  that scores tokens through `add_fused_lm_head` or `selective_log_softmax*`) compute their
  log-probs with fused_dpo: `fused_dpo.integrations.trl.patch()`, or `with patched(): ...`.
"""

__all__ = ["trl"]
