# Shim: metadata lives in pyproject.toml. The only thing this file does is install the top-level
# `kernels/` folder as the subpackage `fused_dpo.kernels` (a top-level `kernels` module would
# clash with another PyPI package of that name).
from setuptools import setup

setup(
    packages=["fused_dpo", "fused_dpo.train", "fused_dpo.integrations", "fused_dpo.kernels"],
    package_dir={"fused_dpo.kernels": "kernels"},
)
