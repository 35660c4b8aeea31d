"""Split-KV decode attention against dense masked attention and a per-query loop; the merge's
associativity; the model's cache attention on each impl (the kernels picked by shape); prefill +
token-by-token decode == full forward (uniform and ragged batches; split-KV and the Pallas
kernels); `trainer.generate` greedy == argmax of full forwards."""

import ast
import math
import re

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kernels.reference import merge_partials
from layers.attention import ops
from layers.attention.decode import (decode_masks, reference_decode_attention,
                                     split_kv_decode_attention, tree_merge)
from layers.attention.flash import flash_attention_lse
from layers.models import ModelSpec, build_model
from tests import helpers

# Jitted once per static configuration: eager dispatch of flash's loops costs more than compiling.
split_kv = jax.jit(split_kv_decode_attention,
                   static_argnames=("chunk", "num_splits", "causal", "block_q", "return_lse"))
reference = jax.jit(reference_decode_attention, static_argnames=("causal",))

# -- the function against references ---------------------------------------------------


def naive_decode(q, k, v, lengths, causal, kv_seg=None):
  """Per (row, head, query) softmax over the visible cache slots, in float64 numpy."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  b, t, n, h = q.shape
  kvh = k.shape[2]
  out = np.zeros_like(q)
  for bi in range(b):
    for i in range(t):
      slot = lengths[bi] - t + i
      js = [j for j in range(lengths[bi]) if (not causal or j <= slot) and (kv_seg is None or kv_seg[bi, j] != 0)]
      if not js:
        continue
      for ni in range(n):
        ki = ni // (n // kvh)
        s = np.array([q[bi, i, ni] @ k[bi, j, ki] for j in js]) / math.sqrt(h)
        p = np.exp(s - s.max())
        p /= p.sum()
        out[bi, i, ni] = sum(pj * v[bi, j, ki] for pj, j in zip(p, js))
  return out


def _inputs(b=4, t=2, n=4, kv=2, h=8, s=13, seed=0, dtype=np.float32):
  r = np.random.default_rng(seed)
  q = r.normal(size=(b, t, n, h)).astype(dtype)
  k = r.normal(size=(b, s, kv, h)).astype(dtype)
  v = r.normal(size=(b, s, kv, h)).astype(dtype)
  return q, k, v


# Ragged: an empty row, a row shorter than one chunk, one not a multiple of it, a full one.
LENGTHS = np.array([0, 1, 7, 13], np.int32)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kv", [4, 1])
def test_reference_matches_naive_loop(causal, kv):
  q, k, v = _inputs(kv=kv)
  got = np.asarray(reference(q, k, v, LENGTHS, causal=causal))
  want = naive_decode(q, k, v, LENGTHS, causal)
  assert np.abs(got - want).max() < 1e-5
  assert np.all(got[0] == 0)  # the empty row: zeros, not NaNs


@pytest.mark.parametrize("split, causal", [
    (dict(chunk=1), True),  # every slot its own partial
    (dict(chunk=5), True),  # 13 = 2 chunks + a 3-slot remainder
    (dict(chunk=13), True),  # one partial
    (dict(chunk=5), False),
    (dict(chunk=64), False),  # a chunk longer than the cache
    (dict(num_splits=4), False),  # chunk ceil(13 / 4) = 4: three chunks + a 1-slot remainder
])
def test_split_kv_matches_reference_fp32(split, causal):
  q, k, v = _inputs()
  got, lse = split_kv(q, k, v, LENGTHS, causal=causal, return_lse=True, **split)
  want = reference(q, k, v, LENGTHS, causal=causal)
  err = np.abs(np.asarray(got) - np.asarray(want))
  assert err.max() < 2e-6, f"max err {err.max():.2e} mean {err.mean():.2e}"
  assert np.all(np.asarray(got)[0] == 0) and np.all(np.isneginf(np.asarray(lse)[0]))
  # lse is the log of the softmax normaliser over the visible slots (here: row 3, last query, head 0).
  s = np.einsum("h,sh->s", q[3, -1, 0], k[3, :, 0]) / math.sqrt(q.shape[-1])
  np.testing.assert_allclose(np.asarray(lse)[3, -1, 0], np.log(np.exp(s).sum()), rtol=1e-5)


def test_split_kv_with_segment_ids_hides_padded_slots():
  """A batch sharing one write position: padded prompt slots (segment 0) inside the length stay hidden."""
  q, k, v = _inputs(t=1)
  kv_seg = np.ones((4, 13), np.int32)
  kv_seg[1, 3:9] = 0
  kv_seg[2, :2] = 0
  lengths = np.array([13, 11, 13, 5], np.int32)
  got = split_kv(q, k, v, lengths, chunk=4, kv_segment_ids=kv_seg)
  want = naive_decode(q, k, v, lengths, causal=True, kv_seg=kv_seg)
  assert np.abs(np.asarray(got) - want).max() < 1e-5
  assert np.abs(want - naive_decode(q, k, v, lengths, causal=True)).max() > 1e-2  # the hidden slots matter


def test_split_kv_gradients_match_reference():
  # Causal only: bidirectional differs just in the mask, whose forward is checked above.
  causal = True
  q, k, v = _inputs()
  w = np.random.default_rng(1).normal(size=q.shape).astype(np.float32)
  f_split = lambda q, k, v: jnp.sum(split_kv_decode_attention(q, k, v, LENGTHS, chunk=5, causal=causal) * w)
  f_ref = lambda q, k, v: jnp.sum(reference_decode_attention(q, k, v, LENGTHS, causal=causal) * w)
  grad = lambda f: jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, k, v)
  for a, b in zip(grad(f_split), grad(f_ref)):
    a, b = np.asarray(a), np.asarray(b)
    assert np.all(np.isfinite(a))
    assert np.abs(a - b).max() < 2e-5, f"max err {np.abs(a - b).max():.2e}"


def test_split_kv_bf16_close_to_fp32_reference():
  q, k, v = _inputs()
  got = split_kv(*(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)), LENGTHS, chunk=5)
  assert got.dtype == jnp.bfloat16
  want = np.asarray(reference(q, k, v, LENGTHS))
  err = np.abs(np.asarray(got, np.float32) - want)
  assert err.max() < 5e-2 and err.mean() < 5e-3, f"max err {err.max():.2e} mean {err.mean():.2e}"


def test_gqa_never_materialises_a_per_query_head_cache():
  """No intermediate is as large as K/V repeated to N query heads ([B, S, N, H])."""
  b, t, n, kv, h, s = 2, 1, 8, 2, 16, 64
  q, k, v = _inputs(b=b, t=t, n=n, kv=kv, h=h, s=s)
  jaxpr = jax.make_jaxpr(lambda q, k, v: split_kv_decode_attention(q, k, v, np.array([64, 30]), chunk=16))(q, k, v)

  def sizes(jx):
    for eqn in jx.eqns:
      for var in eqn.outvars:
        yield int(np.prod(var.aval.shape)) if hasattr(var.aval, "shape") else 0
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        yield from sizes(sub)

  assert max(sizes(jaxpr.jaxpr)) < b * s * n * h


# -- the merge -------------------------------------------------------------------------


@jax.jit
def _range_partial(q, k, v, lengths, lo, hi):
  """The partial (o, lse) over cache slots [lo, hi) only (others hidden by segment id 0; one compile for all)."""
  q_seg, kv_seg, q_idx, kv_idx = decode_masks(lengths, q.shape[1], k.shape[1])
  kv_seg = jnp.where((kv_idx >= lo) & (kv_idx < hi), kv_seg, 0)
  return flash_attention_lse(q, k, v, q_seg, kv_seg, q_idx, kv_idx, causal=True, block_k=8)


def _partition_partials(q, k, v, lengths, bounds):
  return [_range_partial(q, k, v, lengths, lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]


_merge = jax.jit(merge_partials)


def _random_tree(parts, rng):
  """Merges adjacent partials in a random order until one is left."""
  parts = list(parts)
  while len(parts) > 1:
    i = int(rng.integers(0, len(parts) - 1))
    parts[i:i + 2] = [_merge(*parts[i], *parts[i + 1])]
  return parts[0]


def test_merge_of_random_unequal_partitions_in_any_grouping_equals_dense():
  q, k, v = _inputs(s=29)
  lengths = np.array([0, 3, 17, 29], np.int32)
  want = np.asarray(reference(q, k, v, lengths))
  rng = np.random.default_rng(0)
  for _ in range(2):
    cuts = np.sort(rng.choice(np.arange(1, 29), size=int(rng.integers(2, 7)), replace=False))
    parts = _partition_partials(q, k, v, lengths, [0, *cuts.tolist(), 29])
    results = [
        _random_tree(parts, rng),
        _random_tree(parts, rng),
        jax.jit(tree_merge)(jnp.stack([p[0] for p in parts]), jnp.stack([p[1] for p in parts])),
        _random_tree([parts[i] for i in rng.permutation(len(parts))], rng),  # commutative too
    ]
    for o, lse in results:
      assert np.abs(np.asarray(o) - want).max() < 2e-6
      np.testing.assert_allclose(np.asarray(lse), np.asarray(results[0][1]), rtol=1e-6)


def _kernel_names(f, *args):
  text = str(jax.make_jaxpr(f)(*args))
  return set(re.findall(r"\bname=(flash_decode|decode_tpu|flash_fwd|flash_tpu_fwd)\b", text)) | (
      {"pallas"} if "pallas_call" in text else set())


@pytest.mark.parametrize("backend, h, t, kernel", [
    ("gpu", 16, 1, "flash_decode"),  # Triton decode kernel (interpreted here)
    ("gpu", 16, 3, "flash_decode"),
    ("gpu", 16, 40, "flash_fwd"),  # a long prefill: the flash kernel with explicit positions
    ("tpu", 128, 2, "decode_tpu"),  # Mosaic decode kernel (TPU interpreter)
    ("gpu", 8, 1, None),  # head dim 8: no kernel tiles it, pure-JAX split-KV
])
def test_cached_attention_picks_a_kernel_and_equals_reference(backend, h, t, kernel):
  """The model's cache layout (one write position; a packed row, a padded prompt with a gap, a
  row of padding queries): `ops.decode_attention(impl="pallas")` equals the dense masked reference
  and runs the kernel its shapes call for."""
  b, n, kv, s, length = 3, 4, 2, 64, 48
  r = np.random.default_rng(7)
  q = jnp.asarray(r.normal(size=(b, t, n, h)), jnp.float32)
  k, v = (jnp.asarray(r.normal(size=(b, s, kv, h)), jnp.float32) for _ in range(2))
  kseg = np.zeros((b, s), np.int32)
  kseg[0, :20], kseg[0, 20:length] = 1, 2  # packed: the new tokens continue segment 2
  kseg[1, :5], kseg[1, length - t:length] = 1, 1  # a short prompt, a padding gap, the new tokens
  kseg[2, :length - t] = 1  # new tokens that are padding
  qseg = kseg[:, length - t:length].copy()
  f = lambda q, k, v: ops.decode_attention(q, k, v, length, qseg, kseg, causal=True, impl="pallas", platform=backend)
  got = jax.jit(f)(q, k, v)
  want = reference_decode_attention(q, k, v, np.full(b, length), q_segment_ids=qseg, kv_segment_ids=kseg)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)
  names = _kernel_names(f, q, k, v)
  assert names == ({kernel, "pallas"} if kernel else set()), names


# -- inside a model --------------------------------------------------------------------

def _spec(mixer, impl="xla", **kw):
  # decode_chunk 5 cuts the 15-slot caches below into three chunks (remainders: the unit tests).
  options = (("decode_chunk", 5),) + ((("block_k", 4), ("block_q", 4)) if mixer == "flash" else ())
  if impl == "pallas":  # head dim 16 and 16-slot caches: shapes the decode kernel tiles
    kw = dict(d_model=64, **kw)
  if mixer == "local":  # a window shorter than the runs below, so the ring buffer wraps
    options = (("block", 2), ("window", 4))
  base = dict(kind="lm", vocab_size=50, num_classes=50, max_len=16, mixers=(mixer,) * 2, d_model=32, num_heads=4,
              num_kv_heads=2, mlp_ratio=2, mlp="swiglu", norm="rmsnorm", positions="rope", dropout=0.0,
              pooling="mean", tie_embeddings=True, dtype="float32", mixer_options=((mixer, options),),
              attention_impl=impl)
  base.update(kw)
  return ModelSpec(**base)


def _compiled(model):
  """(forward, decode) of `model` under nnx.jit."""
  forward = nnx.jit(lambda m, batch: m(batch))
  decode = nnx.jit(lambda m, batch: m(batch, decode=True))
  return (lambda batch: forward(model, batch)), (lambda batch: decode(model, batch))


def _batch(ids, seg, pos):
  return {"inputs": np.asarray(ids, np.int32), "segment_ids": np.asarray(seg, np.int32),
          "positions": np.asarray(pos, np.int32)}


# Cache attention per impl: xla and flash run the pure-JAX split-KV path over the cache, pallas
# the decode kernel (kernels/decode_pallas.py, interpreted here); local keeps a ring buffer.
@pytest.mark.parametrize("mixer, impl", [("attention", "xla"), ("flash", "flash"), ("attention", "pallas"),
                                         ("local", "xla")])
def test_prefill_then_decode_equals_full_forward(mixer, impl):
  model = build_model(_spec(mixer, impl), seed=3)
  forward, decode = _compiled(model)
  t, pre = 12, 5
  ids = np.random.default_rng(0).integers(1, 50, size=(2, t))
  pos = np.broadcast_to(np.arange(t), (2, t))
  full = np.asarray(forward(_batch(ids, np.ones_like(ids), pos)))
  model.encoder.init_cache(batch=2, max_len=16 if impl == "pallas" else 15)
  outs = [decode(_batch(ids[:, :pre], np.ones((2, pre)), pos[:, :pre]))]
  for i in range(pre, t):
    outs.append(decode(_batch(ids[:, i:i + 1], np.ones((2, 1)), pos[:, i:i + 1])))
  np.testing.assert_allclose(np.concatenate([np.asarray(o) for o in outs], axis=1), full, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("mixer, impl", [("attention", "xla"), ("flash", "flash"), ("attention", "pallas"),
                                         ("local", "xla"), ("mamba", "xla"), ("mamba2", "xla")])
def test_ragged_batch_decode_equals_each_rows_full_forward(mixer, impl):
  """Prompts of lengths 3 and 6 right-padded into one prefill, then 5 shared decode steps.

  Row 0's cache keeps 3 padding slots between its prompt and its new tokens; its
  positions continue from 3. Each row must match a full forward pass of its own
  sequence (prompt then continuation, with no gap).
  """
  model = build_model(_spec(mixer, impl), seed=5)
  forward, decode = _compiled(model)
  r = np.random.default_rng(1)
  lens, width, steps = [3, 6], 6, 5
  prompts = [r.integers(1, 50, size=n) for n in lens]
  cont = r.integers(1, 50, size=(2, steps))
  # Each row's own sequence, right-padded (causal: the padding after it changes nothing).
  seqs, seq_seg = np.zeros((2, width + steps), np.int32), np.zeros((2, width + steps), np.int32)
  for b, (p, c, n) in enumerate(zip(prompts, cont, lens)):
    seqs[b, :n + steps], seq_seg[b, :n + steps] = np.concatenate([p, c]), 1
  fulls = np.asarray(forward(_batch(seqs, seq_seg, np.broadcast_to(np.arange(width + steps), seqs.shape))))
  model.encoder.init_cache(batch=2, max_len=16 if impl == "pallas" else 15)
  ids = np.zeros((2, width), np.int32)
  seg = np.zeros((2, width), np.int32)
  for b, (p, n) in enumerate(zip(prompts, lens)):
    ids[b, :n], seg[b, :n] = p, 1
  pre = np.asarray(decode(_batch(ids, seg, np.broadcast_to(np.arange(width), (2, width)))))
  for b, n in enumerate(lens):
    np.testing.assert_allclose(pre[b, :n], fulls[b][:n], atol=2e-5, rtol=1e-5)
  for i in range(steps):
    pos = np.array([[n + i] for n in lens])
    step = np.asarray(decode(_batch(cont[:, i:i + 1], np.ones((2, 1)), pos)))
    for b, n in enumerate(lens):
      np.testing.assert_allclose(step[b, 0], fulls[b][n + i], atol=2e-5, rtol=1e-5)


# -- trainer.generate ------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("gen"))
  assert helpers.train(workdir) == 0
  return workdir


def _generate(workdir, *extra):
  from trainer import generate
  return generate.main([*helpers.TINY, f"--workdir={workdir}", *extra])


def _restore(workdir):
  from trainer.config import load_config, split_override_args
  from trainer.experiment import Experiment
  rest, overrides = split_override_args(helpers.TINY)
  cfg = load_config(rest[0].split("=", 1)[1], overrides)  # rest[0] is --config=...
  exp = Experiment(cfg, workdir, read_only=True)
  state, _ = exp.checkpointer.restore(exp.abstract_state)
  return exp, state


def _greedy_by_full_forwards(fm, params, extra, prompt, n_new, seq_len):
  """Reference: grow the sequence one argmax at a time, re-running the whole model each time."""
  apply = jax.jit(lambda ids, seg, pos: fm.apply(params, extra, {"inputs": ids, "segment_ids": seg,
                                                                 "positions": pos})[0])
  tokens = list(prompt)
  for _ in range(n_new):
    ids = np.zeros((1, seq_len), np.int32)
    ids[0, :len(tokens)] = tokens
    seg = (np.arange(seq_len) < len(tokens)).astype(np.int32)[None]
    logits = np.asarray(apply(ids, seg, np.arange(seq_len, dtype=np.int32)[None]))[0, len(tokens) - 1]
    tokens.append(int(np.argmax(logits[1:])) + 1)  # id 0 (padding) is never generated
  return tokens[len(prompt):]


def test_generate_cli_greedy_equals_repeated_full_forward(trained, capsys):
  from trainer.generate import decode_tokens, encode_prompt
  prompt = "def f(x):\n  return "
  assert _generate(trained, f"--prompt={prompt}", "--max_new_tokens=12", "--temperature=0") == 0
  lines = capsys.readouterr().out.splitlines()
  printed = {k: ast.literal_eval(v.strip()) for k, v in (l.split(":", 1) for l in lines if ":" in l)
             if k in ("prompt", "continuation")}
  exp, state = _restore(trained)
  want = _greedy_by_full_forwards(exp.fm, state["params"], state["extra"], encode_prompt("text", prompt, 257), 12,
                                  exp.task.spec.seq_len)
  assert printed == {"prompt": prompt, "continuation": decode_tokens("text", want)}
  exp.checkpointer.close()


def test_sampler_greedy_equals_full_forward_on_a_context_sensitive_model(trained):
  """The smoke checkpoint's greedy text is nearly constant, so the token-level check uses
  its params scaled up (sharp attention, outputs that depend on every position)."""
  from trainer.generate import make_sampler
  exp, state = _restore(trained)
  r = np.random.default_rng(0)
  params = {k: jnp.asarray(np.asarray(v) * 3 + r.normal(size=v.shape).astype(np.float32) * 0.3)
            for k, v in state["params"].items()}
  prompt = np.array([72, 101, 108, 108, 112, 33], np.int32)
  n_new = 10
  want = _greedy_by_full_forwards(exp.fm, params, state["extra"], prompt, n_new, exp.task.spec.seq_len)
  assert len(set(want)) > 3  # otherwise the comparison below could not catch a wrong cache or position
  model = exp.fm.module(params, state["extra"])
  model.encoder.init_cache(2, len(prompt) + n_new - 1)
  got = make_sampler(model, len(prompt), n_new, temperature=0.0, top_k=0, banned=(0,))(
      np.stack([prompt, prompt]), jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(got), np.array([want, want]))
  exp.checkpointer.close()


def test_sample_respects_temperature_and_top_k():
  from trainer.generate import sample
  logits = jnp.log(jnp.array([[0.05, 0.4, 0.3, 0.2, 0.05]] * 4000))
  draws = np.asarray(sample(logits, jax.random.key(0), temperature=1.0, top_k=3, banned=()))
  assert set(np.unique(draws)) == {1, 2, 3}
  freq = np.bincount(draws, minlength=5)[1:4] / len(draws)
  np.testing.assert_allclose(freq, np.array([0.4, 0.3, 0.2]) / 0.9, atol=0.03)
  hot = np.asarray(sample(logits, jax.random.key(0), temperature=0.25, top_k=0, banned=(1,)))
  assert 1 not in hot and np.mean(hot == 2) > 0.7  # (0.3/0.2)^4 ~ 5: a low temperature sharpens toward the max
  assert np.all(np.asarray(sample(logits, jax.random.key(1), temperature=2.0, top_k=1)) == 1)


def test_generate_user_errors_exit_2(trained, tmp_path, capsys):
  cases = [
      ([f"--workdir={tmp_path}", "--prompt=hi"], "holds no checkpoints"),
      ([f"--workdir={trained}", "--prompt=" + "x" * 33], "longer than task.seq_len=32"),
      ([f"--workdir={trained}", "--prompt=hello", "--max_new_tokens=40"], "use --max_new_tokens <= 28"),
      ([f"--workdir={trained}", "--prompt=", "--max_new_tokens=4"], "--prompt is empty"),
      ([f"--workdir={trained}", "--prompt=hi", "--top_k=-1"], "--top_k=-1"),
  ]
  for args, message in cases:
    from trainer import generate
    assert generate.main([*helpers.TINY, *args]) == 2, args
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and message in err, err
  from trainer import generate
  assert generate.main(["--config=configs/listops.py:smoke", f"--workdir={tmp_path}", "--prompt=hi"]) == 2
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert err.startswith("error: ") and "needs a causal language-model task" in err, err


def test_prompt_tokenizers_round_trip_and_reject_bad_ids():
  from trainer.config import UserError
  from trainer.generate import decode_tokens, encode_prompt
  ids = encode_prompt("text", "é\n", 257)
  np.testing.assert_array_equal(ids, np.array([0xC3 + 1, 0xA9 + 1, 10 + 1]))  # UTF-8 bytes, shifted by one
  assert decode_tokens("text", ids) == "é\n"
  np.testing.assert_array_equal(encode_prompt("mqar", "5, 4100 0", 8192), [5, 4100, 0])
  with pytest.raises(UserError, match="outside the task's vocabulary"):
    encode_prompt("mqar", "5 8192", 8192)
  with pytest.raises(UserError, match="token ids separated"):
    encode_prompt("mqar", "five", 8192)


def test_sampler_runs_the_model_at_its_training_step():
  """Performer's features are a function of the step (redrawn every `redraw_every`): the
  sampler given step 5 must decode with step 5's features. Sampled at temperature 1 with the
  sampler's keys (token k drawn with fold_in(key, k)), its tokens equal draws from full
  forwards at step 5, which here differ from step 0's (so the check can fail)."""
  from layers.functional import FunctionalModel
  from trainer.generate import make_sampler, sample
  spec = _spec("performer", num_kv_heads=4, mixer_options=(("performer", (("redraw_every", 1), ("features", 4))),))
  fm = FunctionalModel(build_model(spec, seed=11))
  params, extra = fm.init_params(), fm.init_extra()
  prompt, n_new, width, key = np.array([7, 3, 41, 12, 9], np.int32), 10, 16, jax.random.key(4)

  def drawn(step):
    apply = jax.jit(lambda ids, seg, pos: fm.apply(params, extra, {"inputs": ids, "segment_ids": seg,
                                                                   "positions": pos}, step=step)[0])
    tokens = list(prompt)
    for k in range(n_new):
      ids = np.zeros((1, width), np.int32)
      ids[0, :len(tokens)] = tokens
      seg = (np.arange(width) < len(tokens)).astype(np.int32)[None]
      logits = apply(ids, seg, np.arange(width, dtype=np.int32)[None])[:, len(tokens) - 1]
      tokens.append(int(sample(logits, jax.random.fold_in(key, k), 1.0, 0, (0,))[0]))
    return tokens[len(prompt):]

  want = drawn(5)
  assert want != drawn(0)
  model = fm.module(params, extra)
  model.encoder.init_cache(1, width)
  got = make_sampler(model, len(prompt), n_new, temperature=1.0, top_k=0, banned=(0,), step=5)(prompt[None], key)
  assert np.asarray(got)[0].tolist() == want
