"""Models = shared encoder (embedding + blocks + final norm) + a task head.

Heads: causal LM (next token), sequence classification (mean or CLS pooling), and a
dual encoder for two-sequence matching (LRA Retrieval: [u, v, u*v, u-v] -> MLP).
Every model maps a batch dict to logits and names its targets and weights, so the
trainer computes one weighted cross-entropy for all of them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from layers import axes
from layers import remat as remat_lib
from layers.blocks import Block
from layers.core import Dense, Embed, Norm, param
from layers.mixers import MixContext, MixerSpec

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """The model settings, as plain hashable values (from `config.model` + the task)."""
  kind: str  # "lm" | "classify" | "match"
  vocab_size: int
  num_classes: int
  max_len: int
  mixers: tuple[str, ...]  # one per layer
  d_model: int
  num_heads: int
  num_kv_heads: int
  mlp_ratio: int
  mlp: str
  norm: str
  positions: str
  dropout: float
  pooling: str
  tie_embeddings: bool
  dtype: str
  attention_impl: str = "xla"
  # Per-mixer settings: ((mixer name, ((key, value), ...)), ...), from config `model.<mixer>.*`.
  mixer_options: tuple = ()
  # norm="prepbn": PRepBN's settings ((key, value), ...) (total_steps, warmup_steps, r0).
  norm_options: tuple = ()
  remat: str = remat_lib.DEFAULT  # what each block keeps for the backward pass in training (layers/remat.py)
  scan_blocks: bool = False  # consecutive identical blocks as one lax.scan (Encoder._scan)


class Encoder(nnx.Module):
  """Token embedding (+ learned positions) -> blocks -> final norm."""

  def __init__(self, spec: ModelSpec, *, rngs: nnx.Rngs):
    self.spec = spec
    self.embed = Embed(spec.vocab_size, spec.d_model, rngs=rngs)
    self.pos_embed = (param(rngs, jax.nn.initializers.normal(0.02), (spec.max_len, spec.d_model),
                            (None, axes.EMBED)) if spec.positions == "learned" else None)
    causal = spec.kind == "lm"
    self.blocks = nnx.List([
        Block(name, MixerSpec(d_model=spec.d_model, num_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads,
                              causal=causal, positions=spec.positions, layer_index=i,
                              kind_index=spec.mixers[:i].count(name),
                              num_layers=len(spec.mixers), max_len=spec.max_len,
                              attention_impl=spec.attention_impl,
                              options=dict(spec.mixer_options).get(name, ()), name=name,
                              residual_branches=1 if spec.mlp == "none" else 2),
              norm=spec.norm, mlp=spec.mlp, mlp_ratio=spec.mlp_ratio, dropout_rate=spec.dropout, rngs=rngs,
              norm_options=spec.norm_options)
        for i, name in enumerate(spec.mixers)
    ])
    self.final_norm = Norm(spec.d_model, "layernorm" if spec.norm == "prepbn" else spec.norm, rngs=rngs)

  def __call__(self, ids_bt, segment_ids_bt, positions_bt, *, index_bt=None, dropout_rng=None, training=False,
               step=None, prepare=False,
               decode=False) -> jax.Array:
    dtype = DTYPES[self.spec.dtype]
    x = self.embed(ids_bt, dtype)
    if self.pos_embed is not None:
      x = x + jnp.take(self.pos_embed[...], positions_bt, axis=0).astype(dtype)
    x = axes.constrain(x, axes.ACT_BTD)
    # Remat only where a gradient is taken: not in evaluation, decoding or the prepare call.
    policy = remat_lib.policy(self.spec.remat) if training and not (decode or prepare) else None
    rngs = [None if dropout_rng is None else jax.random.fold_in(dropout_rng, i) for i in range(len(self.blocks))]
    for start, stop in self._runs() if not (decode or prepare) else [(i, i + 1) for i in range(len(self.blocks))]:
      if stop - start > 1:
        x = self._scan(start, stop, x, segment_ids_bt, positions_bt, rngs, index_bt, step, training, policy)
        continue
      block, rng = self.blocks[start], rngs[start]
      if policy is None:
        x = block(x, MixContext(segment_ids=segment_ids_bt, positions=positions_bt, dropout_rng=rng,
                                training=training, decode=decode, index=index_bt, step=step, prepare=prepare))
      else:
        x = nnx.remat(_train_block, policy=policy)(block, x, segment_ids_bt, positions_bt, rng, index_bt, step)
    return self.final_norm(x)

  def _runs(self) -> list[tuple[int, int]]:
    """[start, stop) stretches of blocks run together: with `scan_blocks`, each maximal stretch
    of consecutive layers of one mixer that does not depend on its layer (Mixer.LAYER_INDEXED);
    otherwise, and for every other layer, one block each."""
    runs: list[tuple[int, int, bool]] = []
    for i, name in enumerate(self.spec.mixers):
      scannable = self.spec.scan_blocks and not type(self.blocks[i].mixer).LAYER_INDEXED
      if scannable and runs and runs[-1][1] == i and self.spec.mixers[runs[-1][0]] == name and runs[-1][2]:
        runs[-1] = (runs[-1][0], i + 1, True)
      else:
        runs.append((i, i + 1, scannable))
    return [(a, b) for a, b, _ in runs]

  def _scan(self, start, stop, x_btd, segment_ids_bt, positions_bt, rngs, index_bt, step, training, policy):
    """Blocks start..stop-1 as one `lax.scan`: the first block's module applied to each block's
    parameters in turn (stacked along a new leading axis for the scan, so the program holds one
    block, not stop - start). Parameters keep their per-block names, shardings and checkpoint
    layout; the stacking is a copy of the stretch's parameters made inside the step. Whatever
    the blocks update or sow (running statistics, auxiliary losses) is written back per block."""
    blocks = [self.blocks[i] for i in range(start, stop)]
    graphdef, first = nnx.split(blocks[0])
    states = [first] + [nnx.split(b)[1] for b in blocks[1:]]
    stacked = jax.tree.map(lambda *v: jnp.stack(v), *states)
    layer_rngs = None if rngs[start] is None else jnp.stack(rngs[start:stop])
    # The per-call arrays go in as per-layer inputs, not as values the body closes over: JAX
    # computes what depends only on a scan's loop-invariant values once, outside the loop, for
    # the backward pass, and for a blockwise attention that is its mask for every pair of
    # blocks, [T / bq, T / bk, bq, bk], i.e. the [T, T] matrix that flash attention avoids.
    # Broadcast along the layers, they are no longer invariant (and cost L copies of [B, T]).
    shared = jax.tree.map(lambda a: jnp.broadcast_to(a, (stop - start, *jnp.shape(a))),
                          (segment_ids_bt, positions_bt, index_bt, step))

    def body(x, xs):
      state, rng, (seg, pos, index, at_step) = xs
      block = nnx.merge(graphdef, state)
      if policy is None:
        y = block(x, MixContext(segment_ids=seg, positions=pos, dropout_rng=rng, training=training, index=index,
                                step=at_step))
      else:  # inside a scan the loop already keeps the recomputation apart: no CSE barrier needed
        y = nnx.remat(_train_block, policy=policy, prevent_cse=False)(block, x, seg, pos, rng, index, at_step)
      return y, nnx.split(block)[1]

    x_btd, new_states = jax.lax.scan(body, x_btd, (stacked, layer_rngs, shared))
    for k, block in enumerate(blocks):
      nnx.update(block, jax.tree.map(lambda v, k=k: v[k], new_states))
    return x_btd

  def init_cache(self, batch: int, max_len: int) -> None:
    for block in self.blocks:
      block.mixer.init_cache(batch, max_len, DTYPES[self.spec.dtype])


def _train_block(block: Block, x_btd, segment_ids_bt, positions_bt, dropout_rng, index_bt, step) -> jax.Array:
  """One block's training call with its arrays as arguments, for `nnx.remat` (arguments are
  what the checkpoint keeps; everything the block computes from them is subject to the policy)."""
  return block(x_btd, MixContext(segment_ids=segment_ids_bt, positions=positions_bt, dropout_rng=dropout_rng,
                                 training=True, index=index_bt, step=step))


class LanguageModel(nnx.Module):
  """Causal LM: logits[b, t] predict targets[b, t] (the next token)."""

  def __init__(self, spec: ModelSpec, *, rngs: nnx.Rngs):
    self.encoder = Encoder(spec, rngs=rngs)
    self.head = None if spec.tie_embeddings else Dense((spec.d_model,), (spec.vocab_size,), in_axes=(axes.EMBED,),
                                                        out_axes=(axes.VOCAB,), rngs=rngs)

  def __call__(self, batch, *, dropout_rng=None, training=False, decode=False, step=None,
               prepare=False) -> jax.Array:
    x = self.encoder(batch["inputs"], batch["segment_ids"], batch["positions"], index_bt=batch.get("index"),
                     dropout_rng=dropout_rng, training=training, decode=decode, step=step, prepare=prepare)
    if "score_positions" in batch and not decode:
      # Tasks whose loss sits at a few known positions (MQAR's queries) name them: logits
      # [B, P, V] there only, never [B, T, V] (the head is most of a small model's cost).
      x = jnp.take_along_axis(x, batch["score_positions"][..., None].astype(jnp.int32), axis=1)
    logits = self.encoder.embed.attend(x) if self.head is None else self.head(x)
    return logits.astype(jnp.float32)

  @staticmethod
  def targets_and_weights(batch):
    if "score_positions" in batch:  # the logits are at those positions only
      pick = lambda a: jnp.take_along_axis(a, batch["score_positions"].astype(jnp.int32), axis=1)
      return pick(batch["targets"]), pick(batch["weights"])
    return batch["targets"], batch["weights"]


def _pool(x_btd, segment_ids_bt, positions_bt, pooling: str, num_segments: int = 0):
  """[B, D] per row, or [B, S, D] per packed segment (ids 1..S) when num_segments > 0."""
  if not num_segments:
    if pooling == "cls":
      return x_btd[:, 0]
    w = (segment_ids_bt != 0).astype(x_btd.dtype)[..., None]
    return jnp.sum(x_btd * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)
  # [B, S, T] one-hot membership of each token in segment s+1 (its first token for CLS)
  member = segment_ids_bt[:, None, :] == jnp.arange(1, num_segments + 1)[None, :, None]
  if pooling == "cls":
    member &= (positions_bt == 0)[:, None, :]
  w = member.astype(x_btd.dtype)
  return jnp.einsum("bst,btd->bsd", w, x_btd) / jnp.maximum(jnp.sum(w, axis=-1), 1.0)[..., None]


class Classifier(nnx.Module):
  """Bidirectional encoder, pooled, -> Dense -> class logits."""

  def __init__(self, spec: ModelSpec, *, rngs: nnx.Rngs):
    self.spec = spec
    self.encoder = Encoder(spec, rngs=rngs)
    self.hidden = Dense((spec.d_model,), (spec.d_model,), in_axes=(axes.EMBED,), out_axes=(axes.MLP,), rngs=rngs,
                        use_bias=True)
    self.head = Dense((spec.d_model,), (spec.num_classes,), in_axes=(axes.MLP,), out_axes=(axes.CLASSES,),
                      rngs=rngs, use_bias=True)

  def __call__(self, batch, *, dropout_rng=None, training=False, decode=False, step=None,
               prepare=False) -> jax.Array:
    del decode
    x = self.encoder(batch["inputs"], batch["segment_ids"], batch["positions"], index_bt=batch.get("index"),
                     dropout_rng=dropout_rng, training=training, step=step, prepare=prepare)
    # Packed rows (trainer/data/packing.py) carry one label per segment: [B, S].
    weights = batch.get("label_weights")  # [B] on a finite split's unpacked rows
    slots = weights.shape[1] if weights is not None and weights.ndim == 2 else 0
    pooled = _pool(x, batch["segment_ids"], batch["positions"], self.spec.pooling, slots)
    return self.head(jax.nn.gelu(self.hidden(pooled))).astype(jnp.float32)

  @staticmethod
  def targets_and_weights(batch):
    if "label_weights" in batch:  # packed: only the slots holding an example count; fillers weigh 0
      return batch["label"], batch["label_weights"]
    return batch["label"], jnp.ones(batch["label"].shape, jnp.float32)


class DualEncoder(nnx.Module):
  """Two sequences through one shared encoder; [u, v, u*v, u-v] -> MLP -> class logits."""

  def __init__(self, spec: ModelSpec, *, rngs: nnx.Rngs):
    self.spec = spec
    d = spec.d_model
    self.encoder = Encoder(spec, rngs=rngs)
    self.hidden = Dense((4 * d,), (d,), in_axes=(axes.EMBED,), out_axes=(axes.MLP,), rngs=rngs, use_bias=True)
    self.head = Dense((d,), (spec.num_classes,), in_axes=(axes.MLP,), out_axes=(axes.CLASSES,), rngs=rngs,
                      use_bias=True)

  def __call__(self, batch, *, dropout_rng=None, training=False, decode=False, step=None,
               prepare=False) -> jax.Array:
    del decode
    r1 = r2 = None
    if dropout_rng is not None:
      r1, r2 = jax.random.split(dropout_rng)
    u = _pool(self.encoder(batch["inputs"], batch["segment_ids"], batch["positions"], index_bt=batch.get("index"),
                           dropout_rng=r1, training=training, step=step, prepare=prepare),
              batch["segment_ids"], batch["positions"], self.spec.pooling)
    v = _pool(self.encoder(batch["inputs2"], batch["segment_ids2"], batch["positions2"],
                           index_bt=batch.get("index2"), dropout_rng=r2,
                           training=training, step=step, prepare=prepare),
              batch["segment_ids2"], batch["positions2"], self.spec.pooling)
    feats = jnp.concatenate([u, v, u * v, u - v], axis=-1)
    return self.head(jax.nn.gelu(self.hidden(feats))).astype(jnp.float32)

  @staticmethod
  def targets_and_weights(batch):
    if "label_weights" in batch:  # a finite held-out split's filler rows weigh 0
      return batch["label"], batch["label_weights"]
    return batch["label"], jnp.ones(batch["label"].shape, jnp.float32)


HEADS = {"lm": LanguageModel, "classify": Classifier, "match": DualEncoder}


def build_model(spec: ModelSpec, seed: int) -> nnx.Module:
  return HEADS[spec.kind](spec, rngs=nnx.Rngs(params=seed))
