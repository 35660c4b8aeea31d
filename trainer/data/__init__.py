"""Tasks: locally generated train and held-out splits, deterministic from the seed."""
