"""Triton kernels and their launchers (installed as fused_dpo.kernels)."""
