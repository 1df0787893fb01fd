"""output_dir/model/: the trained model as transformers (or peft) saves it, for from_pretrained."""

from __future__ import annotations


def save_model(trainer) -> None:
    """Write output_dir/model/ for the trainer's current weights (every rank calls it)."""
