"""Orbax checkpoints of the whole train state, with safe fallbacks.

* `DIR/checkpoints/<step>/`: the last `keep_checkpoints` saves. Orbax writes each save
  into a temporary directory and renames it only once complete, so a crash mid-save
  leaves the previous checkpoints untouched.
* `DIR/best_checkpoint/<step>/`: the best save by held-out metric (if `keep_best`).
* Each save holds `state` (params, extra model state, optimizer state, step, rng) and
  `meta` (JSON: step, data position, metrics). The data iterator's state is the step.

Restore targets the current mesh's shardings, so a run saved on one mesh continues on
another. An unreadable latest checkpoint is skipped, with a warning, for the previous one;
when no regular checkpoint is readable, `best_checkpoint/` is the last fallback.

Integrity. Each save's meta records a 64-bit fingerprint of every array of the state
(`checksums`, computed on the devices: a weighted sum of the array's bits modulo 2**32 under
two odd position-dependent weights, so it is independent of the sharding and changes with
any single flipped bit) and a SHA-256 of the rest of the meta (`meta_sha256`). Restore
recomputes both; a mismatch makes the checkpoint unreadable, naming the array. A state with
a non-finite array is never saved (`NonFiniteState`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from trainer.config import UserError
from trainer.workdir import remove_unfinished_checkpoints

log = logging.getLogger("seqmix")


def _manager(directory: str, keep: int, async_save: bool, best: bool = False, read_only: bool = False):
  if read_only:  # evaluate/generate: Orbax warns about every save option it ignores; say none
    absl_log = logging.getLogger("absl")
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)
    try:
      return ocp.CheckpointManager(
          directory,
          item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
          options=ocp.CheckpointManagerOptions(read_only=True, create=False))
    finally:
      absl_log.setLevel(level)
  # Distinct barrier names: both managers may save the same step, and Orbax names its
  # multi-process barriers by step alone.
  opts = dict(max_to_keep=max(keep, 1), enable_async_checkpointing=async_save, create=True,
              multiprocessing_options=ocp.options.MultiprocessingOptions(
                  barrier_sync_key_prefix="best" if best else "latest"))
  if best:
    opts.update(best_fn=lambda m: m["score"], best_mode="max", keep_checkpoints_without_metrics=False)
  return _Manager(
      directory,
      item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
      options=ocp.CheckpointManagerOptions(**opts))


class _Manager(ocp.CheckpointManager):
  """Orbax's manager, minus its own use of JAX's preemption sync point. The train loop alone
  asks the sync point, once per step (trainer/train.py `_Preemption`), and saves at the step it
  agrees on. Orbax would ask it too, in `save` with the step saved and from its background
  finalize thread with the step just finalized, an older one; the sync manager keeps a single
  "last step seen" per process, so a notice landing just after such a call could agree on a
  step that process 0 has already passed, and the processes would stop at different steps."""

  def reached_preemption(self, step: int) -> bool:
    del step
    return False


class NonFiniteState(Exception):
  """The state to be saved holds NaN or inf (`arrays`: their names)."""

  def __init__(self, arrays: list[str]):
    super().__init__(", ".join(arrays))
    self.arrays = arrays


def _leaf_name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


class Unreadable(Exception):
  """A checkpoint shown to be damaged: its files cannot be read, or a checksum does not match."""


def _bits_u32(x):
  """The array's bits as uint32 words of the same shape (1- and 2-byte items widened; 8-byte
  items split into a trailing pair). No reshape: flattening a sharded array would gather it."""
  size = np.dtype(x.dtype).itemsize
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  if size == 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  if size in (1, 2):
    return jax.lax.bitcast_convert_type(x, jnp.uint8 if size == 1 else jnp.uint16).astype(jnp.uint32)
  return jax.lax.bitcast_convert_type(x, jnp.uint32)  # 8 bytes: [..., 2] words


def _flat_index(shape):
  """Row-major element index of every position, built per dimension (no reshape, no gather)."""
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for dim in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, dim) * jnp.uint32(stride % 2**32)
    stride *= shape[dim]
  return index


def _fingerprint_leaf(x):
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  u = _bits_u32(x)
  i = _flat_index(u.shape)
  # Odd weights: a flipped bit b changes the sum by +-2**b * w != 0 (mod 2**32). Sums mod 2**32
  # do not depend on the order of the reduction, so neither does the result on the sharding.
  w1 = (i * jnp.uint32(0x9E3779B1)) * jnp.uint32(2) + jnp.uint32(1)
  w2 = (i * jnp.uint32(0x85EBCA77) + jnp.uint32(0x165667B1)) * jnp.uint32(2) + jnp.uint32(1)
  h1 = jnp.sum(u * w1, dtype=jnp.uint32)
  h2 = jnp.sum((u ^ jnp.uint32(0x27D4EB2F)) * w2, dtype=jnp.uint32)
  finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)
  return jnp.stack([h1, h2]), finite


def _meta_sha256(meta: dict) -> str:
  body = {k: v for k, v in meta.items() if k != "meta_sha256"}
  return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class Checkpointer:

  def __init__(self, workdir: str, keep: int, keep_best: bool, async_save: bool, read_only: bool = False):
    workdir = os.path.abspath(workdir)  # Orbax's tensorstore paths must be absolute
    self.root = os.path.join(workdir, "checkpoints")
    self.read_only = read_only
    if read_only and not os.path.isdir(self.root):
      self.manager = None
    else:
      self.manager = _manager(self.root, keep, async_save, read_only=read_only)
    best_dir = os.path.join(workdir, "best_checkpoint")
    self.best = None
    if keep_best and (not read_only or os.path.isdir(best_dir)):
      self.best = _manager(best_dir, 1, async_save, best=True, read_only=read_only)
    self._fingerprint = None  # (treedef, compiled function)
    self._sealed_cache = None  # ((step, leaf ids), fingerprints) of the last save

  # -- integrity -------------------------------------------------------------------------

  def fingerprints(self, state: dict) -> tuple[dict[str, str], list[str]]:
    """({array name: 16 hex digits}, [names of arrays holding NaN or inf]), computed on the devices."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    if self._fingerprint is None or self._fingerprint[0] != treedef:
      self._fingerprint = (treedef, jax.jit(lambda xs: [_fingerprint_leaf(x) for x in xs]))
    out = jax.device_get(self._fingerprint[1]([x for _, x in leaves]))
    sums, bad = {}, []
    for (path, _), (h, finite) in zip(leaves, out):
      name = _leaf_name(path)
      sums[name] = "".join(f"{int(v):08x}" for v in np.asarray(h))
      if not bool(finite):
        bad.append(name)
    return sums, bad

  def _verify(self, state: dict, meta: dict) -> None:
    """Raises ValueError naming the first array (or the meta) whose checksum does not match."""
    want = meta.get("checksums")
    if want is None:  # saved before checksums were recorded
      return
    have, _ = self.fingerprints(state)
    for name in sorted(set(want) | set(have)):
      if want.get(name) != have.get(name):
        raise Unreadable(f"array {name!r} does not match its checksum")

  def _finalized(self, root: str) -> list[int]:
    if not os.path.isdir(root):
      return []
    return sorted(int(n) for n in os.listdir(root) if n.isdigit() and os.path.isdir(os.path.join(root, n)))

  def last_good(self) -> str:
    """Names the newest finished checkpoint on disk, for messages about a failed save."""
    steps = self._finalized(self.root)
    if steps:
      return f"the last good checkpoint is step {steps[-1]} in {self.root}"
    return f"there is no finished checkpoint in {self.root} yet"

  def last_good_after_wait(self) -> str:
    """`last_good()` once saves under way have finished (or failed)."""
    try:
      self.wait()
    except Exception:  # noqa: BLE001 - a failed save simply is not a good checkpoint
      pass
    return self.last_good()

  def remove_unfinished(self) -> None:
    """Deletes temporary directories of saves that did not finish (after a failed save)."""
    if jax.process_index() == 0:
      remove_unfinished_checkpoints(os.path.dirname(self.root))

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps()) if self.manager else []

  def check_compatible(self, step: int, abstract_state: dict, manager=None) -> None:
    """Raises UserError naming the first array whose saved shape (or presence) differs from the
    config's: parameters first, then the rest of the state (e.g. the optimizer's, which
    `on_nonfinite=skip` or `optimizer.grad_clip` change), so a different config is refused, not
    mistaken for a damaged checkpoint."""
    manager = manager or self.manager
    saved = manager.item_metadata(step)["state"]
    want, have = _named_shapes(abstract_state), _named_shapes(getattr(saved, "tree", saved))
    names = sorted(set(want) | set(have), key=lambda n: (not n.startswith("params/"), n))
    def differs(a, b):
      if a is None or b is None or a[0] != b[0]:
        return True
      return a[1] is not None and b[1] is not None and a[1] != b[1]

    for name in names:
      if differs(want.get(name), have.get(name)):
        shown = name[len("params/"):] if name.startswith("params/") else name
        kind = "parameter" if name.startswith("params/") else "train-state array"
        if name not in have:
          what = "is missing from the checkpoint"
        elif name not in want:
          what = "is in the checkpoint but not in what this config builds"
        elif have[name][0] != want[name][0]:
          what = f"has shape {have[name][0]} in the checkpoint but {want[name][0]} in this config"
        else:
          what = f"has dtype {have[name][1]} in the checkpoint but {want[name][1]} in this config"
        raise UserError(f"the checkpoint at step {step} in {manager.directory} does not match the config: {kind} "
                        f"{shown!r} {what}; use the config it was trained with or a fresh --workdir")

  def restore(self, abstract_state: dict, step: int | None = None,
              check_config: Callable[[int, dict], None] | None = None) -> tuple[dict, dict] | None:
    """Restores `step`, or the newest readable checkpoint; None when there is none.

    A checkpoint is unreadable when its files are damaged or missing or a checksum does
    not match. Unreadable checkpoints skipped on the way are moved to
    DIR/unreadable_checkpoints/ (kept for inspection, never deleted) so training can save
    that step again; read-only users (evaluate) leave them in place. When no regular
    checkpoint is readable, the newest readable one in best_checkpoint/ is used.
    `check_config(step, saved_config)` may refuse a checkpoint (UserError) before its arrays are read.
    """
    if self.manager is None and self.best is None:
      return None
    _drop_closed_loop_noise()
    if step is not None and step not in self.steps():
      raise UserError(f"--step={step} has no checkpoint in {self.root}; saved steps: {self.steps() or 'none'}")
    candidates = [step] if step is not None else list(reversed(self.steps()))
    unreadable, result = [], None
    for s in candidates:
      try:
        result = self._restore_one(self.manager, s, abstract_state, check_config)
      except Unreadable as e:  # damaged files, truncated arrays, missing metadata, checksums, ...
        if step is not None:
          raise UserError(f"checkpoint {s} in {self.root} cannot be read ({e})") from None
        action = ("evaluating the previous one (a training run will set it aside)" if self.read_only
                  else "trying the previous one")
        log.warning("checkpoint %d in %s is unreadable (%s); %s", s, self.root, e, action)
        unreadable.append(s)
        continue
      break
    if unreadable and not self.read_only:
      self._set_aside(unreadable)
    if result is None and step is None and self.best is not None:
      for s in reversed(sorted(self.best.all_steps())):
        try:
          result = self._restore_one(self.best, s, abstract_state, check_config)
        except Unreadable as e:
          log.warning("best checkpoint %d is unreadable too (%s)", s, e)
          continue
        log.warning("no readable checkpoint in %s; %s from best_checkpoint/%d instead", self.root,
                    "evaluating" if self.read_only else "resuming", s)
        break
    if result is None and candidates and not self.read_only:
      log.warning("no readable checkpoint in %s; starting from scratch", self.root)
    return result

  def restore_best(self, abstract_state: dict, check_config: Callable[[int, dict], None] | None = None
                   ) -> tuple[dict, dict] | None:
    """The best checkpoint (highest held-out score among the evaluations saved), or None if none is readable."""
    if self.best is None:
      return None
    _drop_closed_loop_noise()
    self.best.reload()
    for s in reversed(sorted(self.best.all_steps())):
      try:
        return self._restore_one(self.best, s, abstract_state, check_config)
      except Unreadable as e:
        log.warning("best checkpoint %d in %s is unreadable (%s)", s, os.path.dirname(self.root), e)
    return None

  def _restore_one(self, manager, s: int, abstract_state: dict, check_config) -> tuple[dict, dict]:
    with _reading():
      meta = dict(manager.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
    if "meta_sha256" in meta and meta["meta_sha256"] != _meta_sha256(meta):
      raise Unreadable("its meta does not match its checksum")
    if check_config is not None and "config" in meta:
      check_config(s, meta["config"])
    with _reading():
      self.check_compatible(s, abstract_state, manager)
      restored = manager.restore(s, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    state = restored["state"]
    self._verify(state, meta)
    return state, meta

  def _set_aside(self, steps: list[int]) -> None:
    if jax.process_index() == 0:
      dest = os.path.join(os.path.dirname(self.root), "unreadable_checkpoints")
      os.makedirs(dest, exist_ok=True)
      for s in steps:
        target = os.path.join(dest, f"{s}-{int(time.time())}")
        os.replace(os.path.join(self.root, str(s)), target)
        log.warning("moved unreadable checkpoint %d to %s", s, target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("seqmix_set_aside_checkpoints")
    self.manager.reload()

  def _sealed(self, step: int, state: dict, meta: dict[str, Any]) -> dict:
    key = (step, tuple(id(x) for x in jax.tree.leaves(state)))
    if self._sealed_cache is not None and self._sealed_cache[0] == key:  # save_best and save of one step
      sums, bad = self._sealed_cache[1]
    else:
      sums, bad = self.fingerprints(state)
      self._sealed_cache = (key, (sums, bad))
    if bad:
      raise NonFiniteState(bad)
    meta = dict(meta, checksums=sums)
    meta["meta_sha256"] = _meta_sha256(meta)
    return meta

  def save(self, step: int, state: dict, meta: dict[str, Any]) -> None:
    """Saves asynchronously (when configured); raises NonFiniteState instead of saving NaN/inf."""
    meta = self._sealed(step, state, meta)
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                      force=True)

  def save_best(self, step: int, state: dict, meta: dict[str, Any], score: float) -> None:
    if self.best is None or step in self.best.all_steps():  # a step redone after a fallback: already kept
      return
    meta = self._sealed(step, state, meta)
    self.best.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                   metrics={"score": float(score)}, force=True)

  def wait(self) -> None:
    for m in (self.manager, self.best):
      if m is not None:
        m.wait_until_finished()

  def close(self) -> None:
    for m in (self.manager, self.best):
      if m is not None:
        m.close()


def _named_shapes(tree) -> dict[str, tuple]:
  """{array name: (shape, dtype name)} of a state or of a checkpoint's metadata tree."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  out = {}
  for p, x in leaves:
    dtype = getattr(x, "dtype", None)
    try:
      dtype = np.dtype(dtype).name if dtype is not None else None
    except TypeError:  # e.g. a PRNG key type: compared by shape alone
      dtype = None
    out[_leaf_name(p)] = (tuple(getattr(x, "shape", ())), dtype)
  return out


def _drop_closed_loop_noise() -> None:
  """When the storage library fails to read a damaged checkpoint, callbacks of its reads still
  in flight land on an event loop already closed, and each prints "RuntimeError: Event loop
  is closed" as an unraisable exception: dozens of tracebacks around the one warning that
  matters. Drops exactly those (installed once, for the process)."""
  previous = sys.unraisablehook
  if getattr(previous, "seqmix_closed_loop", False):
    return

  def hook(args):
    if isinstance(args.exc_value, RuntimeError) and str(args.exc_value) == "Event loop is closed":
      return
    previous(args)

  hook.seqmix_closed_loop = True
  sys.unraisablehook = hook


_TRANSIENT_ERRNOS = (errno.ENOMEM, errno.ETIMEDOUT, errno.EAGAIN, errno.EINTR, errno.EMFILE, errno.ENFILE)


def _transient(e: BaseException) -> bool:
  """Errors that say nothing about the checkpoint: memory, the runtime, a busy system."""
  if isinstance(e, MemoryError) or type(e).__name__ in ("XlaRuntimeError", "JaxRuntimeError"):
    return True
  if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
    return True
  return "Out of memory" in str(e)


@contextlib.contextmanager
def _reading():
  """Turns what reading a damaged checkpoint raises into Unreadable; user mistakes and
  transient errors (which must not get a good checkpoint set aside) pass through."""
  try:
    yield
  except (UserError, Unreadable):
    raise
  except Exception as e:  # noqa: BLE001 - Orbax and tensorstore raise many types for damaged files
    if _transient(e):
      raise
    raise Unreadable(_why(e)) from None


def _why(e: BaseException) -> str:
  first = str(e).splitlines()[0][:200] if str(e) else ""
  return f"{type(e).__name__}: {first}" if first else type(e).__name__
