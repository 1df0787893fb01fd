"""GPU microbenchmarks for fused_dpo (`python -m bench --help`)."""
