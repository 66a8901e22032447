"""diffusers / PyTorch <-> ctcal_jax conversion: torch-free loading, LoRA formats."""

from conversion.load import load_component

__all__ = ["load_component"]
