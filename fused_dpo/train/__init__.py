"""Thin DPO trainer (see fused_dpo.train.trainer)."""
