"""Orbax checkpoints of the whole train state, with safe fallbacks.

* `DIR/checkpoints/<step>/`: the last `keep_checkpoints` saves. Orbax writes each save
  into a temporary directory and renames it only once complete, so a crash mid-save
  leaves the previous checkpoints untouched.
* `DIR/best_checkpoint/<step>/`: the best save by held-out metric (if `keep_best`).
* Each save holds `state` (params, extra model state, optimizer state, step, rng) and
  `meta` (JSON: step, data position, metrics). The data iterator's state is the step.

Restore targets the current mesh's shardings, so a run saved on one mesh continues on
another. An unreadable latest checkpoint is skipped, with a warning, for the previous one.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import jax
import orbax.checkpoint as ocp

from trainer.config import UserError

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
  return ocp.CheckpointManager(
      directory,
      item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
      options=ocp.CheckpointManagerOptions(**opts))


def _flat_shapes(tree, prefix="") -> dict[str, tuple]:
  out = {}
  if isinstance(tree, dict):
    for k, v in tree.items():
      out.update(_flat_shapes(v, f"{prefix}{k}/" if prefix or k else ""))
  elif isinstance(tree, (list, tuple)):
    for i, v in enumerate(tree):
      out.update(_flat_shapes(v, f"{prefix}{i}/"))
  elif hasattr(tree, "shape"):
    out[prefix.rstrip("/")] = tuple(tree.shape)
  return out


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

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps()) if self.manager else []

  def check_compatible(self, step: int, abstract_state: dict) -> None:
    """Raises UserError naming the first parameter whose saved shape differs from the config's."""
    saved = self.manager.item_metadata(step)["state"]
    saved_tree = getattr(saved, "tree", saved)
    want = _flat_shapes(abstract_state["params"])
    have = _flat_shapes(saved_tree["params"])
    for name in sorted(set(want) | set(have)):
      if want.get(name) != have.get(name):
        if name not in have:
          what = "is missing from the checkpoint"
        elif name not in want:
          what = "is in the checkpoint but not in the model this config builds"
        else:
          what = f"has shape {have[name]} in the checkpoint but {want[name]} in this config"
        raise UserError(f"the checkpoint at step {step} in {self.root} does not match the config: parameter "
                        f"{name!r} {what}; use the config it was trained with or a fresh --workdir")

  def restore(self, abstract_state: dict, step: int | None = None) -> tuple[dict, dict] | None:
    """Restores `step`, or the newest readable checkpoint; None when there is none.

    Unreadable checkpoints skipped on the way are moved to DIR/unreadable_checkpoints/
    (kept for inspection, never deleted) so training can save that step again.
    """
    if self.manager is None:
      return None
    if step is not None and step not in self.steps():
      raise UserError(f"--step={step} has no checkpoint in {self.root}; saved steps: {self.steps() or 'none'}")
    candidates = [step] if step is not None else list(reversed(self.steps()))
    unreadable, result = [], None
    for s in candidates:
      try:
        self.check_compatible(s, abstract_state)
        restored = self.manager.restore(s, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
      except UserError:
        raise
      except Exception as e:  # damaged files, truncated arrays, missing metadata, ...
        if step is not None:
          raise UserError(f"checkpoint {s} in {self.root} cannot be read ({type(e).__name__})") from None
        first = str(e).splitlines()[0][:200] if str(e) else ""
        log.warning("checkpoint %d in %s is unreadable (%s: %s); trying the previous one", s, self.root,
                    type(e).__name__, first)
        unreadable.append(s)
        continue
      result = restored["state"], dict(restored["meta"])
      break
    if unreadable and not self.read_only:
      self._set_aside(unreadable)
    if result is None and candidates:
      log.warning("no readable checkpoint in %s; starting from scratch", self.root)
    return result

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

  def save(self, step: int, state: dict, meta: dict[str, Any]) -> None:
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                      force=True)

  def save_best(self, step: int, state: dict, meta: dict[str, Any], score: float) -> None:
    if self.best is None or step in self.best.all_steps():  # a step redone after a fallback: already kept
      return
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
