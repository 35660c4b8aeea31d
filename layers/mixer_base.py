"""The contract every token mixer implements (see `layers.mixers` for the registry)."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any

import jax
from flax import nnx


@dataclasses.dataclass(frozen=True)
class MixerSpec:
  """Everything a mixer's constructor may need; built once per layer from the config."""
  d_model: int
  num_heads: int
  num_kv_heads: int
  causal: bool
  positions: str  # "rope" | "learned" | "none"; rope is applied inside attention mixers
  layer_index: int
  num_layers: int
  max_len: int
  attention_impl: str = "xla"
  # This layer's index among the layers of the same mixer (0 for the first): what "alternating
  # layers" counts (Swin's shift, the Sparse Transformer's alternate heads), so that in a mixed
  # schedule such as "local,swin,local,swin" the two swin layers still alternate. None: the
  # layer index (a stack of one mixer).
  kind_index: int | None = None
  # This mixer's own settings (config `model.<mixer name>.*`) as sorted (key, value) pairs:
  # hashable, because NNX keeps the spec as static module data.
  options: tuple = ()
  # The mixer's registry name (config `model.mixer` / a `mixer_schedule` entry): per-mixer
  # choices such as `parallel.sequence_overrides` key on it. "" when built outside a model.
  name: str = ""
  # Residual branches per block (2: mixer and MLP; 1: `model.mlp=none`), for initialisations
  # that scale a branch's output projection by 1 / sqrt(branches * num_layers).
  residual_branches: int = 2

  @property
  def alternation_index(self) -> int:
    return self.layer_index if self.kind_index is None else self.kind_index

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  def option(self, key: str, default: Any = None) -> Any:
    return dict(self.options).get(key, default)


@dataclasses.dataclass(frozen=True)
class MixContext:
  """Per-call inputs besides the activations. Arrays are [B, T]."""
  segment_ids: jax.Array  # 0 = padding; tokens attend only within equal nonzero ids
  positions: jax.Array  # position of each token within its own segment
  dropout_rng: jax.Array | None = None  # None: no dropout
  training: bool = False  # True inside the train step (e.g. BatchNorm uses batch statistics)
  # True position of each stored token, for causal masks; None = storage order (0..T-1).
  # Differs from storage order when rows are stored permuted (zigzag load balancing).
  index: jax.Array | None = None
  decode: bool = False  # True: use and advance the decode state in nnx.Cache variables
  # The training step (int32 scalar; the state's step at evaluation), for mixers with
  # step schedules (Performer's feature redraws, PRepBN's LN->BN blend); None = 0.
  step: jax.Array | None = None
  # True in the one call on the first training batch of a fresh run (see Mixer.prepare).
  prepare: bool = False

  def token_index(self) -> jax.Array:
    if self.index is not None:
      return self.index
    b, t = self.segment_ids.shape
    return jax.numpy.broadcast_to(jax.numpy.arange(t, dtype=jax.numpy.int32), (b, t))


# What a mixer offers sequence-parallel strategies (parallel/strategy.py); a strategy needs one.
ATTENTION = "attention"  # an exact softmax-attention core that splits over key chunks (ring, all_gather)
HEADS = "heads"  # a computation independent per head given whole rows (all_to_all)
SUMMARY = "summary"  # a recurrence whose chunk state is an associative summary (scan)
HALO = "halo"  # reads only the few tokens beside each token (halo)
INDEX = "index"  # masks by the true positions (ctx.index), so rows may be stored permuted (zigzag)


class Mixer(nnx.Module):
  """Base class (documentation of the contract; subclasses override both methods)."""

  # Capabilities (above) that sequence-parallel strategies may use; with none, only "auto"
  # (compiler-propagated shardings, which works for every mixer) applies.
  SEQUENCE_CAPABILITIES: frozenset = frozenset()
  # False for a mixer that, bidirectional and without learned position embeddings, cannot
  # tell token order (kernelised attention applies no rotary embedding): the trainer
  # refuses such a model rather than train a bag of tokens.
  ORDER_AWARE: bool = True
  # Non-empty for a mixer through which examples packed into one row (task.packing) can see
  # each other: the reason, which the trainer gives when it refuses such a run.
  PACKING_LEAK: str = ""
  # True for a mixer whose computation depends on its layer (`spec.layer_index` or
  # `spec.alternation_index`: per-layer random patterns or features, alternating shifts,
  # a per-layer plan). `model.scan_blocks` runs consecutive layers of one mixer with the
  # first layer's module and their stacked parameters, so it never scans such a mixer.
  LAYER_INDEXED: bool = False

  def __call__(self, x_btd: jax.Array, ctx: MixContext) -> jax.Array:
    raise NotImplementedError

  def init_cache(self, batch: int, max_len: int, dtype) -> None:
    raise NotImplementedError(f"{type(self).__name__} does not support incremental decoding")

  def prepare(self, x_btd: jax.Array, ctx: MixContext) -> None:
    """Data-dependent initialisation of non-param state from this layer's inputs on the first
    training batch of a fresh run (e.g. EcoFormer learns its hash functions). Default: nothing."""


# The sequence-parallel strategies in force while the model is traced (a
# `parallel.sequence.SequenceParallel`, installed by `use_sequence_parallel`); None on one
# device or without one.
_SEQUENCE_PARALLEL = contextvars.ContextVar("seqmix_sequence_parallel", default=None)


def sequence_parallel(mixer):
  """The strategy `mixer` runs under (a `parallel.strategy.Strategy`), or None: no sequence
  parallelism, or the compiler's own sharding ("auto")."""
  active = _SEQUENCE_PARALLEL.get()
  return None if active is None else active.for_mixer(mixer)


@contextlib.contextmanager
def use_sequence_parallel(sp):
  token = _SEQUENCE_PARALLEL.set(sp)
  try:
    yield
  finally:
    _SEQUENCE_PARALLEL.reset(token)


def add_aux_loss(module: nnx.Module, value: jax.Array) -> None:
  """Adds `value` to the training loss (collected by `layers.functional.FunctionalModel.apply`).

  The one place the mechanism lives: today `sow` into nnx.Intermediate, which newer flax
  wants wrapped in `nnx.capture`; when that is the only way, only this function changes.
  """
  module.sow(nnx.Intermediate, "aux_loss", value)
