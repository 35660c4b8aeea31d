"""Flax NNX layers: token mixers (by name, through `layers.mixers`), blocks and task heads."""
