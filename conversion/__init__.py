"""diffusers / PyTorch <-> ctcal_jax conversion: torch-free loading, LoRA formats."""

from conversion.encoders import load_encoders
from conversion.load import load_component
from conversion.lora import export_component, export_lora, import_lora

__all__ = ["load_component", "load_encoders", "import_lora", "export_lora", "export_component"]
