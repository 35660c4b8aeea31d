"""State-space mixers: Mamba (selective SSM) and the Legendre Memory Unit."""
