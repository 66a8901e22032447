"""Experiments: programs that measure the methods (`python -m ctcal_jax.experiments.NAME`)."""
