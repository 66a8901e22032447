"""Flax Linen models matching the diffusers / transformers PyTorch classes (SPEC §1)."""
