"""An NNX model as pure functions of flat, string-keyed parameter dicts.

The trainer, optimizer, checkpoints and shardings all see `{"encoder/blocks/0/mixer/
query/kernel": array, ...}`: flat names make sharding rules, weight-decay masks and
"which parameter differs" errors simple, and keep checkpoints independent of NNX's
internal tree types. `apply` merges the arrays back into the module for one call.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from layers.core import logical_axes_of, weight_decay_of


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def _path_name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


class _Collection:
  """One NNX state collection, flattened to names in a fixed order."""

  def __init__(self, state):
    self.leaves, self.treedef = jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_var)
    self.names = [_path_name(p) for p, _ in self.leaves]

  def arrays(self) -> dict[str, jax.Array]:
    # `get_value()` rather than `v[...]`: abstract (eval_shape) variables hold ShapeDtypeStructs.
    return {n: v.get_value() for n, (_, v) in zip(self.names, self.leaves)}

  def rebuild(self, flat: dict[str, jax.Array]):
    return jax.tree.unflatten(self.treedef, [v.replace(flat[n]) for n, (_, v) in zip(self.names, self.leaves)])


class FunctionalModel:
  """Splits `module` into graph + params (nnx.Param) + extra state (everything else, e.g. nnx.BatchStat)."""

  def __init__(self, module: nnx.Module):
    self.graphdef, params, extra = nnx.split(module, nnx.Param, ...)
    self._params, self._extra = _Collection(params), _Collection(extra)
    self.logical_axes = {n: logical_axes_of(v) for n, (_, v) in zip(self._params.names, self._params.leaves)}
    self.extra_logical_axes = {n: logical_axes_of(v) for n, (_, v) in zip(self._extra.names, self._extra.leaves)}
    # Parameters declared weight_decay=False (layers.core.param), whatever their rank.
    self.no_decay = frozenset(n for n, (_, v) in zip(self._params.names, self._params.leaves)
                              if not weight_decay_of(v))
    self.module_type = type(module)

  def init_params(self) -> dict[str, jax.Array]:
    return self._params.arrays()

  def init_extra(self) -> dict[str, jax.Array]:
    return self._extra.arrays()

  def module(self, params: dict, extra: dict) -> nnx.Module:
    return nnx.merge(self.graphdef, self._params.rebuild(params), self._extra.rebuild(extra))

  def apply(self, params: dict, extra: dict, batch: dict, *, dropout_rng=None, training: bool = False, step=None):
    """Returns (logits, aux_loss, new_extra). `aux_loss` sums every sown "aux_loss"."""
    model = self.module(params, extra)
    logits = model(batch, dropout_rng=dropout_rng, training=training, step=step)
    sown = nnx.pop(model, nnx.Intermediate)
    aux = jnp.zeros((), jnp.float32)
    for path, value in jax.tree_util.tree_flatten_with_path(sown)[0]:
      if "aux_loss" in _path_name(path):
        aux = aux + jnp.sum(value).astype(jnp.float32)
    _, _, new_extra = nnx.split(model, nnx.Param, ...)
    return logits, aux, _Collection(new_extra).arrays() if self._extra.names else {}

  def prepare(self, params: dict, extra: dict, batch: dict) -> dict:
    """New extra state after every mixer's `prepare` on `batch` (fresh runs; see Mixer.prepare)."""
    model = self.module(params, extra)
    model(batch, prepare=True)
    nnx.pop(model, nnx.Intermediate)
    _, _, new_extra = nnx.split(model, nnx.Param, ...)
    return _Collection(new_extra).arrays() if self._extra.names else {}

  def targets_and_weights(self, batch):
    return self.module_type.targets_and_weights(batch)
