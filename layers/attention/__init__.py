"""The softmax-attention family."""
