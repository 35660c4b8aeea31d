"""Everything a run needs, built once from a validated config: task, mesh, model,
optimizer, shardings, the compiled steps and the checkpointer. Shared by train,
evaluate and generate, so all three see the same model and the same data.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from layers.functional import FunctionalModel
from layers import mixers
from layers.mixer_base import INDEX, Mixer, use_sequence_parallel
from layers.models import ModelSpec, build_model
from parallel import mesh as mesh_lib
from parallel.sequence import STRATEGIES, SequenceParallel, SequenceParallelError, zigzag_permutation
from trainer import config as config_lib
from trainer import optim, steps
from trainer import workdir as workdir_lib
from trainer.checkpoint import Checkpointer
from trainer.config import UserError
from trainer.data import pipeline
from trainer.data.base import DataError
from trainer.data.tasks import make_task
from trainer.workdir import check_workdir

log = logging.getLogger("seqmix")

# Config keys that may change between a run and its resumption without changing what is
# trained: how long, how often to log/evaluate/save, the input pipeline's threads, the mesh
# and sequence strategy (the same model computed on other devices), how the same model is
# computed (kernels, activation dtype, chunk and block sizes of blockwise/scan computations,
# decode splits), where the data lives.
RESUMABLE_KEYS = ("total_steps", "log_every", "eval_every", "eval_examples", "eval_split", "checkpoint_every",
                  "keep_checkpoints", "keep_best", "eval_best_at_end", "async_checkpointing", "progress_bar", "max_skipped",
                  "allow_config_change", "profile.", "logging.", "data.", "mesh.", "parallel.", "task.tfds.data_dir", "optimizer.grad_accum_steps",
                  "task.retrieval.data_dir", "model.attention_impl", "model.schedule_for.", "model.remat", "model.scan_blocks", "model.dtype", "model.flash.",
                  "model.attention.decode_chunk", "model.local.block", "model.linear.chunk", "model.performer.chunk",
                  "model.ecoformer.chunk", "model.transnormer.chunk", "model.sla.chunk", "model.mamba.scan",
                  "model.mamba.chunk", "model.mamba2.scan", "model.mamba2.chunk", "model.lmu.impl", "model.lmu.chunk", "model.lmu.direct_max_len")


def config_changes(saved: dict, current: dict) -> dict[str, tuple]:
  """{key: (saved value, current value)} for keys that change what is trained. Keys absent
  from either side (added or removed between versions of seqmix) are not compared."""
  a, b = config_lib.flatten(saved), config_lib.flatten(current)
  # The layers the model is built from, whatever key set them (mixer, mixer_schedule or a
  # schedule_for entry): compared as one synthetic key, so schedule_for entries of other
  # mixers may change freely (RESUMABLE_KEYS) and a layout change is never missed.
  for flat, tree in ((a, saved), (b, current)):
    try:
      flat["model.layers"] = ",".join(config_lib.mixer_schedule(ml_collections.ConfigDict(tree)))
    except (AttributeError, KeyError, TypeError):  # a config of another seqmix version: not compared
      pass
  if "model.layers" in a and "model.layers" in b and a["model.layers"] == b["model.layers"]:
    for flat in (a, b):  # the same layers, however they were named: not a change
      for k in [k for k in flat if k in ("model.mixer", "model.mixer_schedule")]:
        del flat[k]
  out = {}
  for k in sorted(set(a) & set(b)):
    if a[k] != b[k] and not any(k == r or (r.endswith(".") and k.startswith(r)) for r in RESUMABLE_KEYS):
      out[k] = (a[k], b[k])
  return out


def model_spec(cfg, task_spec) -> ModelSpec:
  m = cfg.model
  return ModelSpec(
      kind=task_spec.kind, vocab_size=task_spec.vocab_size, num_classes=task_spec.num_classes,
      max_len=task_spec.seq_len, mixers=tuple(config_lib.mixer_schedule(cfg)), d_model=m.d_model,
      num_heads=m.num_heads, num_kv_heads=m.num_kv_heads or m.num_heads, mlp_ratio=m.mlp_ratio, mlp=m.mlp,
      norm=m.norm, positions=m.positions, dropout=m.dropout, pooling=m.pooling, tie_embeddings=m.tie_embeddings,
      dtype=m.dtype, attention_impl=m.attention_impl, remat=m.remat, scan_blocks=m.scan_blocks,
      mixer_options=mixer_options(cfg, task_spec.grid),
      norm_options=(("r0", float(m.prepbn.r0)), ("total_steps", int(m.prepbn.total_steps or cfg.total_steps)),
                    ("warmup_steps", int(m.prepbn.warmup_steps))) if m.norm == "prepbn" else ())


def mixer_options(cfg, grid=(0, 0)) -> tuple:
  """`model.<mixer>` sub-dicts of the mixers in use, as hashable sorted pairs. A 2-D mixer's
  `grid` left at (0, 0) takes the task's image grid (e.g. 32 x 32 for CIFAR-10)."""
  out = []
  for name in sorted(set(config_lib.mixer_schedule(cfg))):
    group = cfg.model.get(name, None)
    if group is not None:
      items = dict(group.items())
      if "grid" in items and not any(_freeze(items["grid"]) if isinstance(items["grid"], (tuple, list))
                                     else [items["grid"]]) and any(grid):
        items["grid"] = tuple(grid)
      out.append((name, tuple(sorted((k, _freeze(v)) for k, v in items.items()))))
  return tuple(out)


def _freeze(value):
  return tuple(_freeze(v) for v in value) if isinstance(value, (list, tuple)) else value


class Experiment:

  def __init__(self, cfg, workdir: str, *, read_only: bool = False):
    self.cfg, self.workdir = cfg, workdir
    try:
      self.task = make_task(cfg.task, cfg.seed, cfg.eval_examples, cfg.batch_size)
    except DataError as e:
      raise UserError(str(e)) from None
    schedule = config_lib.mixer_schedule(cfg)
    if (self.task.spec.kind != "lm" and cfg.model.positions != "learned"
        and not any(mixers.MIXERS[m].ORDER_AWARE for m in schedule)):
      raise UserError(f"model.positions={cfg.model.positions!r} gives mixer {schedule[0]!r} no token order in a "
                      f"bidirectional model (it applies no rotary embedding); use model.positions=learned")
    self.mesh = mesh_lib.make_mesh(cfg.mesh)
    self.rules = tuple(cfg.mesh.rules)
    dp = mesh_lib.batch_parallel_size(self.mesh, self.rules)
    if cfg.batch_size % dp:
      raise UserError(f"batch_size={cfg.batch_size} is not divisible by the data-parallel size {dp} "
                      f"(mesh.data x mesh.fsdp); use a multiple of {dp}")
    k = cfg.optimizer.grad_accum_steps
    if (cfg.batch_size // dp) % k:
      raise UserError(f"optimizer.grad_accum_steps={k} does not divide the {cfg.batch_size // dp} rows each of the "
                      f"{dp} data-parallel devices holds (batch_size={cfg.batch_size}); use a batch_size that is a "
                      f"multiple of {dp * k}")
    seq = self.mesh.shape["sequence"]
    if cfg.task.seq_len % seq:
      raise UserError(f"task.seq_len={cfg.task.seq_len} is not divisible by mesh.sequence={seq}; "
                      f"use a multiple of {seq}")
    self.spec = model_spec(cfg, self.task.spec)
    # The abstract model gives structure, names and logical axes without allocating;
    # real parameters are created inside a jit, directly in their shardings.
    try:
      self.fm = FunctionalModel(nnx.eval_shape(lambda: build_model(self.spec, cfg.seed)))
    except ValueError as e:  # a mixer refusing its settings (`model.<mixer>.*`), in one sentence
      raise UserError(str(e).split("\n")[0]) from None
    self.lr_schedule = optim.schedule(cfg.optimizer, cfg.total_steps)
    abstract_params = self.fm.init_params()
    self.tx = optim.make_optimizer(cfg.optimizer, cfg.total_steps, abstract_params, cfg.on_nonfinite == "skip",
                                   self.fm.no_decay)
    self.num_params = int(sum(np.prod(v.shape) for v in abstract_params.values()))

    # Shapes and shardings of the whole train state, derived without allocating it.
    abstract = jax.eval_shape(self._fresh_state_fn())
    self.state_shardings = self._state_shardings(abstract)
    self.abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                       abstract, self.state_shardings)
    self.sequence_parallel = None
    self.layout_perm = None  # zigzag storage order of each row (causal ring load balance)
    strategies = config_lib.sequence_strategies(cfg)  # {mixer name: strategy}
    if seq > 1 and set(strategies.values()) != {"auto"}:
      try:
        self.sequence_parallel = SequenceParallel(self.mesh, self.rules, cfg.parallel.sequence_strategy,
                                                  cfg.parallel.sequence_overrides)
        zigzag = any(STRATEGIES[s].zigzag for s in strategies.values() if s in STRATEGIES)
        if zigzag and cfg.parallel.load_balance and self.spec.kind == "lm":
          # Zigzag rows need every mixer to mask by the true positions.
          plain = sorted(n for n in strategies if INDEX not in mixers.MIXERS[n].SEQUENCE_CAPABILITIES)
          if plain:
            log.warning("parallel.load_balance is off for this model: mixer %r masks by storage order, so rows "
                        "stay in storage order", plain[0])
          else:
            self.layout_perm = zigzag_permutation(cfg.task.seq_len, seq)
      except SequenceParallelError as e:
        raise UserError(str(e)) from None
    self.batch_shapes, self.batch_shardings = pipeline.batch_shardings(self.task, cfg.batch_size, self.mesh,
                                                                       self.rules, self.layout_perm)
    # Only now, with the task, model and mesh accepted, is a training run's workdir made: a refused
    # run leaves none. Read-only users (evaluate, generate, dry runs) never create it here.
    self.lock = None
    self.config_changes: dict[str, tuple] = {}
    if not read_only:
      check_workdir(workdir)
      self.lock = workdir_lib.acquire(workdir)  # one trainer per workdir; refused here otherwise
    self.read_only = read_only
    try:
      self.checkpointer = Checkpointer(workdir, cfg.keep_checkpoints, cfg.keep_best, cfg.async_checkpointing,
                                       read_only=read_only)
    except BaseException:
      if self.lock is not None:
        self.lock.release()
      raise
    self._train_step = self._eval_step = None

  # -- state ---------------------------------------------------------------------------

  def _fresh_state_fn(self):
    spec, tx, seed = self.spec, self.tx, self.cfg.seed

    def fresh():
      fm = FunctionalModel(build_model(spec, seed))
      p = fm.init_params()
      return {"params": p, "extra": fm.init_extra(), "opt_state": tx.init(p),
              "step": jnp.zeros((), jnp.int32), "rng": jax.random.key_data(jax.random.key(seed + 1))}
    return fresh

  def _state_shardings(self, abstract):
    mesh, rules = self.mesh, self.rules
    replicated = NamedSharding(mesh, P())
    params = mesh_lib.tree_shardings(abstract["params"], self.fm.logical_axes, mesh, rules)
    extra = mesh_lib.tree_shardings(abstract["extra"], self.fm.extra_logical_axes, mesh, rules)

    # Optimizer moments mirror the params they belong to (found by their flat names).
    def opt_sharding(path, leaf):
      name = getattr(path[-1], "key", None) if path else None
      if isinstance(name, str) and name in params and tuple(leaf.shape) == tuple(abstract["params"][name].shape):
        return params[name]
      return replicated

    opt = jax.tree_util.tree_map_with_path(opt_sharding, abstract["opt_state"])
    return {"params": params, "extra": extra, "opt_state": opt, "step": replicated, "rng": replicated}

  def fresh_state(self) -> dict:
    with self.tracing():
      return jax.jit(self._fresh_state_fn(), out_shardings=self.state_shardings)()

  def check_config(self, step: int, saved: dict) -> None:
    """Refuses a checkpoint trained with a config that differs in what is trained (see
    RESUMABLE_KEYS for what may change), unless allow_config_change=true."""
    self.config_changes = {}
    changes = config_changes(saved, json.loads(self.cfg.to_json()))
    if not changes:
      return
    listed = ", ".join(f"{k} ({_short(a)} -> {_short(b)})" for k, (a, b) in changes.items())
    if self.read_only:
      # evaluate / generate: the data, its length and the batch may differ (a warning), the model
      # may not: a changed mixer, layout or setting with the same parameter shapes would load and
      # silently compute another function.
      model = ", ".join(f"{k} ({_short(a)} -> {_short(b)})" for k, (a, b) in changes.items()
                        if k.startswith("model."))
      if model:
        raise UserError(f"the checkpoint at step {step} in {self.checkpointer.root} was trained with a different "
                        f"model: {model}; evaluate it with the model settings it was trained with (only the data, "
                        f"its length and how the same model is computed may differ)")
      log.warning("the checkpoint at step %d was trained with a different config: %s", step, listed)
      return
    if not self.cfg.allow_config_change:
      raise UserError(f"the checkpoint at step {step} in {self.checkpointer.root} was trained with a different config: "
                      f"{listed}; use the config it was trained with, a fresh --workdir, or "
                      f"--config.allow_config_change=true to continue with the change")
    self.config_changes = {k: [a, b] for k, (a, b) in changes.items()}
    log.warning("continuing from step %d with a changed config (allow_config_change=true): %s", step, listed)

  def restore_or_init(self, step: int | None = None) -> tuple[dict, dict | None]:
    restored = self.checkpointer.restore(self.abstract_state, step, check_config=self.check_config)
    if self.lock is not None:
      self.lock.announce()
    if restored is None:
      return self.prepared(self.fresh_state()), None
    return restored

  def prepared(self, state: dict) -> dict:
    """A fresh state after the mixers' data-dependent initialisation on the first train batch
    (`Mixer.prepare`, e.g. EcoFormer's hash learning); unchanged when no mixer has one."""
    if all(mixers.MIXERS[m].prepare is Mixer.prepare for m in set(config_lib.mixer_schedule(self.cfg))):
      return state
    with self.tracing():
      fn = jax.jit(self.fm.prepare, out_shardings=self.state_shardings["extra"])
      return dict(state, extra=fn(state["params"], state["extra"], self.train_batch(0)))

  # -- steps ---------------------------------------------------------------------------

  @contextlib.contextmanager
  def tracing(self):
    """Context for tracing the model: activation constraints and the sequence-parallel strategy."""
    with mesh_lib.activation_sharding(self.mesh, self.rules), use_sequence_parallel(self.sequence_parallel):
      yield

  def _lower(self, jitted):
    try:
      return jitted.lower(self.abstract_state, self.batch_shapes)
    except SequenceParallelError as e:
      raise UserError(str(e)) from None

  def compiled_train_step(self):
    if self._train_step is None:
      fn = steps.make_train_step(self.fm, self.tx, self.lr_schedule, self.cfg.optimizer.grad_accum_steps)
      metric_sharding = NamedSharding(self.mesh, P())
      jitted = jax.jit(fn, in_shardings=(self.state_shardings, self.batch_shardings),
                       out_shardings=(self.state_shardings, metric_sharding), donate_argnums=0)
      with self.tracing():
        self._train_step = self._lower(jitted).compile()
    return self._train_step

  def compiled_eval_step(self):
    if self._eval_step is None:
      fn = steps.make_eval_step(self.fm)
      jitted = jax.jit(fn, in_shardings=(self.state_shardings, self.batch_shardings),
                       out_shardings=NamedSharding(self.mesh, P()))
      with self.tracing():
        self._eval_step = self._lower(jitted).compile()
    return self._eval_step

  def compile_stats(self) -> dict:
    """Per-device memory of the compiled train step and its FLOPs per step."""
    compiled = self.compiled_train_step()
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
      cost = cost[0] if cost else {}
    arg, out, tmp = (int(getattr(mem, f"{k}_size_in_bytes", 0)) for k in ("argument", "output", "temp"))
    alias = int(getattr(mem, "alias_size_in_bytes", 0))
    flops = float((cost or {}).get("flops", 0.0))
    k = self.cfg.optimizer.grad_accum_steps
    if (k > 1 or self.spec.scan_blocks) and flops:
      # XLA's cost analysis counts a loop's body once, so the accumulated step reports ~1/k of its
      # FLOPs and scanned blocks count one layer per stretch. Scale by the ratio of the
      # whole-batch, unrolled step's to this step's, both estimated from their (global,
      # unpartitioned) lowered programs, which lowering gives without compiling.
      def lowered_flops(fm, accum):
        fn = steps.make_train_step(fm, self.tx, self.lr_schedule, accum)
        with self.tracing():
          c = self._lower(jax.jit(fn, in_shardings=(self.state_shardings, self.batch_shardings))).cost_analysis()
        c = (c[0] if c else {}) if isinstance(c, (list, tuple)) else c
        return float((c or {}).get("flops", 0.0))

      unrolled = self.fm
      if self.spec.scan_blocks:  # the same parameters, blocks unrolled
        spec = dataclasses.replace(self.spec, scan_blocks=False)
        unrolled = FunctionalModel(nnx.eval_shape(lambda: build_model(spec, self.cfg.seed)))
      whole, looped = lowered_flops(unrolled, 1), lowered_flops(self.fm, k)
      if whole and looped:
        flops *= whole / looped
    return {"argument_bytes": arg, "output_bytes": out, "temp_bytes": tmp, "alias_bytes": alias,
            "total_bytes": arg + out + tmp - alias, "flops_per_step": flops,
            "num_devices": int(self.mesh.size), "num_params": self.num_params}

  # -- data ----------------------------------------------------------------------------

  def train_batch(self, step: int) -> dict:
    ids = pipeline.train_example_ids(step, self.cfg.batch_size)
    return pipeline.global_batch(self.task, "train", ids, self.batch_shapes, self.batch_shardings, self.layout_perm)

  def _stream(self, split: str, id_batches, first: int, stop: int) -> pipeline.BatchStream:
    d = self.cfg.data
    # Worker processes only for the long-lived train stream: a pool per evaluation would start
    # (and load the task into) fresh processes every time.
    workers = d.workers if split == "train" else 0
    return pipeline.BatchStream(self.task, split, id_batches, first, stop, self.batch_shapes, self.batch_shardings,
                                self.layout_perm, threads=d.threads, prefetch=d.prefetch, workers=workers)

  def train_stream(self, start: int) -> pipeline.BatchStream:
    """Train batches start, start+1, ..., total_steps-1, read ahead (the data state is the step)."""
    return self._stream("train", pipeline.TrainIds(self.cfg.batch_size), start, self.cfg.total_steps)

  def num_eval_examples(self, split: str) -> int:
    """Held-out examples one evaluation scores: `eval_examples`, or the whole split if smaller."""
    size = self.task.num_examples(split)
    return self.cfg.eval_examples if size is None else min(self.cfg.eval_examples, size)

  def evaluate(self, state: dict, split: str) -> dict:
    """Held-out loss and accuracy over `eval_examples` examples of `split`."""
    step_fn = self.compiled_eval_step()
    totals = {"nll_sum": 0.0, "correct": 0.0, "count": 0.0}
    examples = self.num_eval_examples(split)
    # Packed rows hold several examples; all `eval_examples` of them sit in the first rows.
    rows = self.task.num_eval_rows(split) if hasattr(self.task, "num_eval_rows") else examples
    id_batches = pipeline.eval_example_ids(rows, self.cfg.batch_size)
    stream = self._stream(split, pipeline.EvalIds(id_batches), 0, len(id_batches))
    try:
      for batch in stream:
        out = step_fn(state, batch)
        for k in totals:
          totals[k] += float(out[k])
    finally:
      stream.close()
    count = max(totals["count"], 1.0)
    loss = totals["nll_sum"] / count
    if not hasattr(self.task, "num_eval_rows"):  # whole batches are scored, up to a finite split's end
      size = self.task.num_examples(split)
      examples = len(id_batches) * self.cfg.batch_size if size is None else min(len(id_batches) * self.cfg.batch_size, size)
    result = {f"{split}/loss": loss, f"{split}/accuracy": totals["correct"] / count, f"{split}/examples": examples}
    if self.task.spec.kind == "lm":
      result[f"{split}/bits_per_token"] = loss / math.log(2)
    return result

  def close(self) -> None:
    """Finishes pending saves, closes the checkpointer and releases the workdir."""
    try:
      self.checkpointer.close()
    finally:
      if self.lock is not None:
        self.lock.release()
        self.lock = None

  def meta(self, step: int, extra: dict | None = None) -> dict:
    return {"step": int(step), "data_position": int(step) * int(self.cfg.batch_size),
            "config": json.loads(self.cfg.to_json()), **(extra or {})}



def _short(value) -> str:
  text = json.dumps(value)
  return text if len(text) <= 40 else text[:37] + "..."
