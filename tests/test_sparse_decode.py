"""Incremental decoding of the causal sparse-pattern mixers (sparse_transformer, longformer,
block_sparse, bigbird, combiner): prefill + token-by-token decode with a cache of `max_len`
slots equals the full causal forward over a row of `max_len` tokens at the same positions,
for a full prompt, a right-padded (ragged) prompt and a packed prompt in one batch; and the
configurations that cannot decode refuse with a sentence naming the mixer."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers import mixers
from layers.attention import patterns as P
from layers.mixer_base import MixContext, MixerSpec
from layers.models import ModelSpec, build_model

N, KV, H = 4, 2, 8  # grouped-query: two query heads per kv head
D = N * H
MAX_LEN = 38  # not a multiple of any block, stride or span below
PROMPT = 7  # prefill width; row 1's prompt is 4 tokens right-padded to it
STEPS = MAX_LEN - PROMPT  # row 0 and row 2 fill the cache exactly

# (mixer, options): every pattern variant, at sizes where the pattern is far from dense.
CASES = {
    "sparse_transformer-strided": ("sparse_transformer", dict(pattern="strided", stride=0)),  # l = ceil(sqrt(38)) = 7
    "sparse_transformer-fixed": ("sparse_transformer", dict(pattern="fixed", stride=6, c=2, head_mode="merged")),
    "block_sparse-local": ("block_sparse", dict(pattern="local", block=4, radius=1)),
    "block_sparse-strided": ("block_sparse", dict(pattern="strided", block=4, radius=0, stride=3)),
    "block_sparse-random": ("block_sparse", dict(pattern="random", block=4, num_random=2, seed=1)),
    # g = 3: blocks 0, 1 and the last one (9 of ceil(38 / 4) = 10, only 2 of its rows exist).
    "bigbird": ("bigbird", dict(block=4, num_global=3, num_random=1, seed=2)),
    # Position 40 >= max_len: ignored, as by a forward over 38 tokens.
    "longformer": ("longformer", dict(window=4, dilation=2, global_positions=(0, 9, 40))),
    "combiner": ("combiner", dict(span=4, summary="identity-mean")),
}
# These prefill their 7 prompt queries in runs of 3 (the last one padded), the others in one go.
CHUNKED = ("sparse_transformer-fixed", "block_sparse-random", "longformer", "combiner")


def _mixer(name, causal=True, layer_index=0, **options):
  spec = MixerSpec(d_model=D, num_heads=N, num_kv_heads=KV, causal=causal, positions="rope", layer_index=layer_index,
                   num_layers=2, max_len=MAX_LEN, options=tuple(sorted(options.items())))
  return mixers.make_mixer(name, spec, rngs=nnx.Rngs(0))


def _rows():
  """Three rows of MAX_LEN tokens as a full forward sees them (segment ids, positions), and
  how each is fed to the decoder: (prompt segment ids [PROMPT], real prompt length)."""
  seg = np.zeros((3, MAX_LEN), np.int32)
  seg[0] = 1
  seg[1, :4 + STEPS] = 1  # the ragged row ends 3 tokens early (its prompt was 3 tokens shorter)
  seg[2, :3], seg[2, 3:] = 1, 2  # a packed prompt: a 3-token example, then the one being continued
  pos = np.zeros_like(seg)
  for b in range(3):
    for i in range(MAX_LEN):
      pos[b, i] = 0 if i == 0 or seg[b, i] != seg[b, i - 1] else pos[b, i - 1] + 1
  prompt_seg = seg[:, :PROMPT].copy()
  prompt_seg[1, 4:] = 0
  return seg, pos, prompt_seg, [PROMPT, 4, PROMPT]


_forward = nnx.jit(lambda m, x, seg, pos: m(x, MixContext(segment_ids=seg, positions=pos)))
_decode = nnx.jit(lambda m, x, seg, pos: m(x, MixContext(segment_ids=seg, positions=pos, decode=True)))


@pytest.mark.parametrize("case", list(CASES))
def test_prefill_then_decode_equals_full_causal_forward(case):
  name, options = CASES[case]
  m = _mixer(name, **options)
  if case in CHUNKED:
    m.DECODE_CHUNK = 3
  seg, pos, prompt_seg, lens = _rows()
  r = np.random.default_rng(0)
  x = r.normal(size=(3, MAX_LEN, D)).astype(np.float32)
  full = np.asarray(_forward(m, x, seg, pos))

  m.init_cache(3, MAX_LEN, jnp.float32)
  # The prompt as stored: row 1 carries garbage behind its 4 real tokens (padding must not matter).
  xp = x[:, :PROMPT].copy()
  xp[1, 4:] = r.normal(size=(PROMPT - 4, D))
  pre = np.asarray(_decode(m, xp, prompt_seg, np.where(prompt_seg > 0, pos[:, :PROMPT], 0)))
  got, want = [], []
  for b, n in enumerate(lens):
    got.append(pre[b, :n])
    want.append(full[b, :n])
  for i in range(STEPS):
    at = np.array(lens) + i  # each row's next position
    rows = np.arange(3)
    step = np.asarray(_decode(m, x[rows, at][:, None], seg[rows, at][:, None], pos[rows, at][:, None]))
    got.append(step[:, 0])
    want.append(full[rows, at])
  got, want = np.concatenate(got), np.concatenate(want)
  err = np.abs(got - want)
  assert err.max() < 1e-5, f"{case}: max err {err.max():.2e} mean {err.mean():.2e}"
  assert np.abs(want).max() > 0.1  # not a comparison of zeros
  np.testing.assert_array_equal(np.asarray(m.cache_length[...]), [MAX_LEN, MAX_LEN - 3, MAX_LEN])


def _causal_density(case):
  """Fraction of the causal triangle the pattern keeps (per head, averaged) over MAX_LEN tokens."""
  name, options = CASES[case]
  m = _mixer(name, **options)
  i, j = np.arange(MAX_LEN)[:, None], np.arange(MAX_LEN)[None, :]
  if name == "longformer":
    pattern = P.longformer_mask(np.ones((1, MAX_LEN), np.int32), window=m.window, causal=True,
                                global_positions=m.global_positions, dilation=m.dilation)[0][0]
    pattern = np.asarray(pattern) | P.global_indicator(m.global_positions, MAX_LEN)[:, None]
  else:
    pattern = np.asarray(m.decode_pattern(jnp.broadcast_to(jnp.arange(MAX_LEN), (1, MAX_LEN)), MAX_LEN))[0]
  return float(np.mean(np.broadcast_to(pattern, (N, MAX_LEN, MAX_LEN))[:, j <= i]))


@pytest.mark.parametrize("case", [c for c in CASES if not c.startswith("combiner")])
def test_the_decoded_patterns_are_sparse(case):
  """The equality above would be weak if a pattern covered everything at these sizes."""
  assert _causal_density(case) < 0.85


@pytest.mark.parametrize("pattern", ["strided", "fixed"])
@pytest.mark.parametrize("head_mode, layer_index", [("split", 0), ("merged", 0), ("alternate", 0), ("alternate", 1)])
def test_sparse_transformer_decode_rows_are_the_reference_masks(pattern, head_mode, layer_index):
  """Every head mode: the mask rows decoding uses are the dense twin's A1 / A2 per head."""
  m = _mixer("sparse_transformer", layer_index=layer_index, pattern=pattern, stride=5, c=2, head_mode=head_mode)
  t = MAX_LEN
  got = np.asarray(m.decode_pattern(jnp.broadcast_to(jnp.arange(t), (1, t)), t))[0]  # [N or 1, T, T]
  a1, a2 = (np.asarray(a)[0] for a in P.sparse_transformer_masks(np.ones((1, t), np.int32), pattern=pattern,
                                                                  stride=5, c=2, causal=True))
  want = {"split": [a1, a1, a2, a2], "merged": [a1 | a2] * N, "alternate": [[a1, a2][layer_index]] * N}[head_mode]
  causal = np.tril(np.ones((t, t), bool))
  np.testing.assert_array_equal(np.broadcast_to(got, (N, t, t)) & causal, np.stack(want))


def test_model_decodes_ragged_prompts():
  """A longformer language model, through `Encoder.init_cache` and the model's decode
  path (embeddings, rotary positions, residuals), as tests/test_decode.py drives exact
  attention: prompts of 3 and 6 tokens right-padded into one prefill, then shared steps; each
  row equals a forward of its own sequence over max_len tokens."""
  names = ("longformer",)  # its own __call__ (global projections); the others share Attention's
  options = tuple((CASES[c][0], tuple(sorted(CASES[c][1].items()))) for c in names)
  max_len = 16
  spec = ModelSpec(kind="lm", vocab_size=50, num_classes=50, max_len=max_len, mixers=names, d_model=D, num_heads=N,
                   num_kv_heads=KV, mlp_ratio=2, mlp="swiglu", norm="rmsnorm", positions="rope", dropout=0.0,
                   pooling="mean", tie_embeddings=True, dtype="float32", mixer_options=options)
  model = build_model(spec, seed=3)
  forward = nnx.jit(lambda m, batch: m(batch))
  decode = nnx.jit(lambda m, batch: m(batch, decode=True))
  batch = lambda ids, seg, pos: {"inputs": np.asarray(ids, np.int32), "segment_ids": np.asarray(seg, np.int32),
                                 "positions": np.asarray(pos, np.int32)}
  r = np.random.default_rng(1)
  lens, width = [3, 6], 6
  steps = max_len - width
  seqs = r.integers(1, 50, size=(2, max_len))
  seq_seg = np.zeros((2, max_len), np.int32)
  for b, n in enumerate(lens):
    seq_seg[b, :n + steps] = 1
  ar = np.broadcast_to(np.arange(max_len), (2, max_len))
  fulls = np.asarray(forward(model, batch(seqs, seq_seg, ar)))
  model.encoder.init_cache(batch=2, max_len=max_len)
  seg = (np.arange(width)[None] < np.array(lens)[:, None]).astype(np.int32)
  pre = np.asarray(decode(model, batch(np.where(seg > 0, seqs[:, :width], 0), seg, ar[:, :width])))
  for b, n in enumerate(lens):
    np.testing.assert_allclose(pre[b, :n], fulls[b, :n], atol=2e-5, rtol=1e-5)
  for i in range(steps):
    at = np.array(lens) + i
    step = np.asarray(decode(model, batch(seqs[[0, 1], at][:, None], np.ones((2, 1)), at[:, None])))
    for b in range(2):
      np.testing.assert_allclose(step[b, 0], fulls[b, at[b]], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["sparse_transformer", "longformer", "block_sparse", "bigbird", "combiner"])
def test_bidirectional_models_refuse_to_decode(name):
  m = _mixer(name, causal=False)
  with pytest.raises(ValueError, match=f"{name} decodes only causally"):
    m.init_cache(1, 8, jnp.float32)
  x, ones = jnp.zeros((1, 2, D)), jnp.ones((1, 2), jnp.int32)
  with pytest.raises(ValueError, match=f"{name} decodes only causally"):
    m(x, MixContext(segment_ids=ones, positions=ones, decode=True))
  # Causal, but decode=True before init_cache: said plainly.
  with pytest.raises(ValueError, match="needs init_cache"):
    _mixer(name)(x, MixContext(segment_ids=ones, positions=ones, decode=True))


def test_xattention_refuses_to_decode_and_says_why():
  m = _mixer("xattention", block=8, stride=4)
  x, ones = jnp.zeros((1, 2, D)), jnp.ones((1, 2), jnp.int32)
  for call in (lambda: m.init_cache(1, 8, jnp.float32),
               lambda: m(x, MixContext(segment_ids=ones, positions=ones, decode=True))):
    with pytest.raises(NotImplementedError, match="xattention does not support incremental decoding.*per input"):
      call()
