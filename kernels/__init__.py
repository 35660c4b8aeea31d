"""Pallas kernels, each beside the pure-JAX reference it is tested against (jax/numpy only: no
ml-collections or flax, so the GPU bench imports them on a bare jax install)."""
