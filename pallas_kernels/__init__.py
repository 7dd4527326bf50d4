"""Standalone Pallas kernels for crosspool_jax; imports only jax."""
