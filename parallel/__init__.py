"""Meshes, logical-axis rules and shardings (and, later, the sequence-parallel collectives)."""
