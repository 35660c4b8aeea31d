"""Logical axis names: the only sharding vocabulary layers use.

`parallel/` maps them to mesh axes through the rules in the config (`mesh.rules`).
"""

import contextlib
import contextvars

BATCH = "batch"
LENGTH = "length"
EMBED = "embed"
HEADS = "heads"
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
MLP = "mlp"
VOCAB = "vocab"
STATE = "state"
CLASSES = "classes"

ALL = (BATCH, LENGTH, EMBED, HEADS, KV_HEADS, HEAD_DIM, MLP, VOCAB, STATE, CLASSES)

# Activation layouts, named by dimension letters (docs/architecture.md#conventions).
ACT_BTD = (BATCH, LENGTH, EMBED)
ACT_BTNH = (BATCH, LENGTH, HEADS, HEAD_DIM)


# The activation-sharding hook. `parallel.mesh.activation_sharding(...)` installs a
# function mapping logical axes to a sharding constraint; without one (single device,
# tests of layers alone) `constrain` is the identity.
_CONSTRAIN = contextvars.ContextVar("seqmix_constrain", default=None)


def constrain(x, logical_axes):
  fn = _CONSTRAIN.get()
  return x if fn is None else fn(x, logical_axes)


@contextlib.contextmanager
def constraint_hook(fn):
  token = _CONSTRAIN.set(fn)
  try:
    yield
  finally:
    _CONSTRAIN.reset(token)
