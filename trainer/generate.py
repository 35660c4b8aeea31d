"""Sample from a trained causal LM checkpoint:
`python -m trainer.generate --config=configs/NAME.py[:ARG] --workdir=DIR [--step=N] --prompt="text"
[--max_new_tokens=N --temperature=T --top_k=K --seed=S --num_samples=B] [--config.KEY=VALUE ...]`.

Restores the checkpoint, fills every mixer's decode state (KV cache, recurrent state)
with the prompt in one jitted prefill call, then samples one token at a time in a
jitted `lax.scan` whose step feeds the previous token through the model with
`decode=True`. Prints the prompt and each continuation (Python string literals, so
control bytes and newlines stay visible). Never writes to DIR.

Prompts are tokenized as the task's data is: the `text` task uses bytes shifted by one
(token = byte + 1, 0 = padding, never sampled); other LM tasks (e.g. `mqar`) take the
prompt as token ids separated by spaces or commas. The context (prompt plus generated
tokens fed back) may not exceed `task.seq_len`, the length the model was trained on.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np

from trainer import launch
from trainer.config import UserError, load_config, split_override_args


# -- tokenizers ------------------------------------------------------------------------

def encode_prompt(task_name: str, prompt: str, vocab_size: int) -> np.ndarray:
  """Prompt -> token ids [P] (int32), as the task's examples are tokenized."""
  if task_name == "text":
    ids = np.frombuffer(prompt.encode("utf-8"), np.uint8).astype(np.int32) + 1  # see trainer/data/text.py
  else:
    words = [w for w in re.split(r"[\s,]+", prompt.strip()) if w]
    try:
      ids = np.array([int(w) for w in words], np.int32)
    except ValueError:
      raise UserError(f"task {task_name!r} takes --prompt as token ids separated by spaces or commas, "
                      f"not {prompt!r}") from None
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    if bad.size:
      raise UserError(f"--prompt token id {int(bad[0])} is outside the task's vocabulary [0, {vocab_size})")
  if ids.size == 0:
    raise UserError("--prompt is empty; give at least one token to continue from")
  return ids


def decode_tokens(task_name: str, ids) -> str:
  ids = np.asarray(ids)
  if task_name == "text":
    return bytes((ids - 1).clip(0, 255).astype(np.uint8)).decode("utf-8", "replace")
  return " ".join(str(int(i)) for i in ids)


def banned_ids(task_name: str) -> tuple[int, ...]:
  """Ids never sampled: the text task's padding id 0 is no byte."""
  return (0,) if task_name == "text" else ()


# -- sampling --------------------------------------------------------------------------

def sample(logits_bv, rng, temperature: float, top_k: int, banned: tuple[int, ...] = ()):
  """Next tokens [B]: argmax if temperature == 0, else softmax(logits / T) over the top k (0: all)."""
  logits = logits_bv.astype(jnp.float32)
  if banned:
    logits = logits.at[:, jnp.array(banned)].set(-jnp.inf)
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def make_sampler(model, prompt_len: int, max_new_tokens: int, *, temperature: float, top_k: int,
                 banned: tuple[int, ...] = (), step: int | None = None):
  """Returns `generate(prompt_bp, rng) -> tokens [B, max_new_tokens]` for an NNX LM whose cache is initialised.

  `step` is the training step the model is run at: mixers whose computation depends on it
  (Performer's random features, redrawn every `redraw_every` steps) then use the features
  the checkpoint was trained and evaluated with, not step 0's.

  The model is split once into its decode state (nnx.Cache) and everything else
  (params, other state); the jitted prefill and decode take both as arguments rather
  than capturing the params as compile-time constants.
  """
  from flax import nnx

  graphdef, cache, rest = nnx.split(model, nnx.Cache, ...)

  def run(rest, cache, tokens_bt, positions_bt, at_step):
    m = nnx.merge(graphdef, cache, rest)
    ones = jnp.ones(tokens_bt.shape, jnp.int32)
    logits = m({"inputs": tokens_bt, "segment_ids": ones, "positions": positions_bt}, decode=True, step=at_step)
    return logits[:, -1], nnx.state(m, nnx.Cache)

  @jax.jit
  def prefill(rest, cache, prompt_bp, rng, at_step):
    b = prompt_bp.shape[0]
    positions = jnp.broadcast_to(jnp.arange(prompt_len, dtype=jnp.int32), (b, prompt_len))
    logits, cache = run(rest, cache, prompt_bp, positions, at_step)
    return sample(logits, rng, temperature, top_k, banned), cache

  @jax.jit
  def decode(rest, cache, first_b, rng, at_step):
    # Step i feeds token i (at position prompt_len + i) and samples token i + 1.
    def one(carry, i):
      cache, token_b = carry
      positions = jnp.full((token_b.shape[0], 1), prompt_len + i, jnp.int32)
      logits, cache = run(rest, cache, token_b[:, None], positions, at_step)
      nxt = sample(logits, jax.random.fold_in(rng, i + 1), temperature, top_k, banned)
      return (cache, nxt), nxt

    _, later_tb = jax.lax.scan(one, (cache, first_b), jnp.arange(max_new_tokens - 1, dtype=jnp.int32))
    return jnp.concatenate([first_b[:, None], later_tb.T], axis=1)

  def generate(prompt_bp, rng, params=None, at_step=None):
    """`params`, `at_step`: the non-cache state (`nnx.split(model, nnx.Cache, ...)[2]`) of
    another model of the same structure and the step to run it at, e.g. the same model later
    in training; the compiled prefill and decode are reused."""
    params = rest if params is None else params
    at_step = jnp.asarray((step or 0) if at_step is None else at_step, jnp.int32)
    first, filled = prefill(params, cache, jnp.asarray(prompt_bp, jnp.int32), jax.random.fold_in(rng, 0), at_step)
    return decode(params, filled, first, rng, at_step)

  return generate


class EvalSamples:
  """Greedy continuations of the first `n` validation examples' openings, made at each
  evaluation of a causal LM (`logging.samples`): what the model writes, beside its loss.

  Prompts: the first P tokens of validation examples 0..n-1, P = min(32, seq_len / 2, the
  shortest of their lengths); continuations: up to `new_tokens` tokens, within the trained
  length. The prefill and decode programs are compiled once and reused at every evaluation.
  One process only (sampling across processes is not built); `reason` says why samples are off.
  """

  def __init__(self, exp, n: int, new_tokens: int):
    from flax import nnx

    self.exp, self.fn, self.reason = exp, None, ""
    spec = exp.task.spec
    if jax.process_count() > 1:
      self.reason = "logging.samples: not made in a multi-process run (not built: sampling there)"
      return
    available = exp.task.num_examples("validation")
    n = n if available is None else min(n, available)  # a finite split: its examples, no fillers
    examples = [exp.task.example("validation", i) for i in range(n)]
    shortest = min(int((ex["segment_ids"] > 0).sum()) for ex in examples)
    p = min(32, spec.seq_len // 2, shortest)
    if p < 1:
      self.reason = "logging.samples: a validation example is empty"
      return
    self.prompts = np.stack([ex["inputs"][:p] for ex in examples]).astype(np.int32)
    self.new = min(new_tokens, spec.seq_len - p + 1)
    model = exp.fm.module(exp.fm.init_params(), exp.fm.init_extra())
    try:
      model.encoder.init_cache(n, spec.seq_len)
    except NotImplementedError as e:
      self.reason = f"logging.samples: {e}"
      return
    self._split = lambda m: nnx.split(m, nnx.Cache, ...)[2]
    self.fn = make_sampler(model, p, self.new, temperature=0.0, top_k=0, banned=banned_ids(exp.cfg.task.name))

  def __call__(self, state) -> list[dict]:
    """[{"prompt": text, "continuation": text}, ...] of the model in `state`."""
    model = self.exp.fm.module(state["params"], state["extra"])
    model.encoder.init_cache(len(self.prompts), self.exp.task.spec.seq_len)
    tokens = np.asarray(jax.device_get(self.fn(self.prompts, jax.random.key(0), params=self._split(model),
                                               at_step=state["step"])))
    name = self.exp.cfg.task.name
    return [{"prompt": decode_tokens(name, p), "continuation": decode_tokens(name, t)}
            for p, t in zip(self.prompts, tokens)]


# -- entry point -----------------------------------------------------------------------

def parse_args(argv):
  parser = argparse.ArgumentParser(prog="python -m trainer.generate", description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/default.py", help="configs/NAME.py[:ARG]")
  parser.add_argument("--workdir", default="runs/default", help="the training run's directory")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest readable)")
  parser.add_argument("--prompt", required=True, help="text to continue (token ids for non-text LM tasks)")
  parser.add_argument("--max_new_tokens", type=int, default=64, help="tokens to generate")
  parser.add_argument("--temperature", type=float, default=1.0, help="softmax temperature; 0 = greedy (argmax)")
  parser.add_argument("--top_k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
  parser.add_argument("--seed", type=int, default=0, help="sampling seed")
  parser.add_argument("--num_samples", type=int, default=1, help="continuations of the prompt, sampled as a batch")
  launch.add_flags(parser)
  rest, overrides = split_override_args(list(argv))
  return parser.parse_args(rest), overrides


def _check_sampling_args(args, vocab_size: int) -> None:
  if args.max_new_tokens < 1:
    raise UserError(f"--max_new_tokens={args.max_new_tokens} must be >= 1")
  if not (args.temperature >= 0 and np.isfinite(args.temperature)):
    raise UserError(f"--temperature={args.temperature} must be a finite number >= 0 (0 = greedy)")
  if not 0 <= args.top_k <= vocab_size:
    raise UserError(f"--top_k={args.top_k} must be in [0, {vocab_size}] (0 = no top-k filter)")
  if args.num_samples < 1:
    raise UserError(f"--num_samples={args.num_samples} must be >= 1")


def load_model(cfg, args):
  """(experiment, restored state, NNX model) for the checkpoint named by the flags."""
  from trainer.experiment import Experiment

  exp = Experiment(cfg, args.workdir, read_only=True)
  if exp.task.spec.kind != "lm":
    raise UserError(f"task.name={cfg.task.name!r} is a {exp.task.spec.kind!r} task; generate needs a causal "
                    f"language-model task (kind 'lm', e.g. text or mqar)")
  if not os.path.isdir(os.path.join(args.workdir, "checkpoints")):
    raise UserError(f"--workdir={args.workdir!r} holds no checkpoints; train first with python -m trainer.train "
                    f"--config={args.config} --workdir={args.workdir}")
  restored = exp.checkpointer.restore(exp.abstract_state, args.step, check_config=exp.check_config)
  if restored is None:
    raise UserError(f"no readable checkpoint in {exp.checkpointer.root}; train first with python -m "
                    f"trainer.train --config={args.config} --workdir={args.workdir}")
  state, _ = restored
  return exp, state, exp.fm.module(state["params"], state["extra"])


def run(argv) -> int:
  args, overrides = parse_args(argv)
  launch.initialize(args)
  cfg = load_config(args.config, overrides)
  exp, state, model = load_model(cfg, args)
  spec = exp.task.spec
  _check_sampling_args(args, spec.vocab_size)
  prompt = encode_prompt(cfg.task.name, args.prompt, spec.vocab_size)
  p = int(prompt.size)
  if p > spec.seq_len:
    raise UserError(f"--prompt is {p} tokens, longer than task.seq_len={spec.seq_len}, the longest context "
                    f"the model was trained on; shorten it")
  # The last sampled token is never fed back, so the context is p + max_new_tokens - 1.
  if p + args.max_new_tokens - 1 > spec.seq_len:
    raise UserError(f"--max_new_tokens={args.max_new_tokens} after a {p}-token prompt needs a "
                    f"{p + args.max_new_tokens - 1}-token context, longer than task.seq_len={spec.seq_len}; "
                    f"use --max_new_tokens <= {spec.seq_len - p + 1}")
  try:
    # A cache of the trained length, not just the context: sparse patterns that depend on the
    # row length (BigBird's last global blocks, automatic strides) are then the trained ones.
    model.encoder.init_cache(args.num_samples, spec.seq_len)
  except NotImplementedError as e:
    raise UserError(f"{e}; choose a config whose mixers all support decoding") from None
  trained_step = int(jax.device_get(state["step"]))
  generate = make_sampler(model, p, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          banned=banned_ids(cfg.task.name), step=trained_step)
  prompt_bp = np.broadcast_to(prompt, (args.num_samples, p))
  tokens = np.asarray(jax.device_get(generate(prompt_bp, jax.random.key(args.seed))))
  if jax.process_index() == 0:
    print(f"step {trained_step}, temperature {args.temperature:g}, top_k {args.top_k}, seed {args.seed}", flush=True)
    print(f"prompt: {decode_tokens(cfg.task.name, prompt)!r}")
    for i, row in enumerate(tokens):
      label = "continuation" if args.num_samples == 1 else f"continuation {i}"
      print(f"{label}: {decode_tokens(cfg.task.name, row)!r}", flush=True)
  exp.close()
  return 0


def main(argv=None) -> int:
  return launch.run_entry(lambda: run(sys.argv[1:] if argv is None else argv))

if __name__ == "__main__":
  sys.exit(main())
