"""Loading a config file, applying `--config.KEY=VALUE` overrides, and validating it.

Configs are Python files with `get_config(arg=None)`. Every user mistake here becomes a
`UserError` whose message is one sentence naming the bad value and what would be valid;
entry points print it without a traceback.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
from typing import Any

import ml_collections


class UserError(Exception):
  """A mistake a person can make (config, data, checkpoint, mesh): reported in one sentence."""


def _flat_keys(cfg: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  keys = []
  for k, v in cfg.items():
    path = f"{prefix}{k}"
    if isinstance(v, ml_collections.ConfigDict):
      keys.extend(_flat_keys(v, path + "."))
    else:
      keys.append(path)
  return keys


def _unknown_key(key: str, cfg: ml_collections.ConfigDict) -> UserError:
  valid = _flat_keys(cfg)
  near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
  if not near:  # a typo in the last component only
    last = key.rsplit(".", 1)[-1]
    near = [k for k in valid if difflib.get_close_matches(last, [k.rsplit(".", 1)[-1]], cutoff=0.75)][:1]
  hint = f"; did you mean {near[0]!r}?" if near else f"; valid top-level keys: {', '.join(sorted(cfg.keys()))}"
  return UserError(f"unknown config key {key!r}{hint}")


def _parse_value(raw: str, current: Any, key: str) -> Any:
  """Parses `raw` to the type of the existing value (ml_collections locks types)."""
  if isinstance(current, bool):
    low = raw.lower()
    if low in ("true", "1", "yes"):
      return True
    if low in ("false", "0", "no"):
      return False
    raise UserError(f"config key {key!r} takes true or false, not {raw!r}")
  if isinstance(current, int):
    try:
      return int(raw)
    except ValueError:
      raise UserError(f"config key {key!r} takes an integer, not {raw!r}") from None
  if isinstance(current, float):
    try:
      return float(raw)
    except ValueError:
      raise UserError(f"config key {key!r} takes a number, not {raw!r}") from None
  if isinstance(current, str) or current is None:
    return raw
  try:  # tuples and lists: a Python literal
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    raise UserError(f"config key {key!r} takes a Python literal like {current!r}, not {raw!r}") from None
  return type(current)(value) if isinstance(current, (tuple, list)) else value


def apply_override(cfg: ml_collections.ConfigDict, key: str, raw: str) -> None:
  node = cfg
  parts = key.split(".")
  for p in parts[:-1]:
    if not isinstance(node, ml_collections.ConfigDict) or p not in node:
      raise _unknown_key(key, cfg)
    node = node[p]
  last = parts[-1]
  if not isinstance(node, ml_collections.ConfigDict) or last not in node:
    raise _unknown_key(key, cfg)
  if isinstance(node[last], ml_collections.ConfigDict):
    raise UserError(f"config key {key!r} is a group; set one of its fields, e.g. {key}.{next(iter(node[last].keys()))}")
  with node.unlocked():
    node[last] = _parse_value(raw, node[last], key)


def load_config(spec: str, overrides: list[str] | tuple[str, ...] = ()) -> ml_collections.ConfigDict:
  """Loads `path.py[:arg]`, applies `KEY=VALUE` overrides, and validates the result."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise UserError(f"config file {path!r} does not exist; configs live in configs/*.py")
  mod_spec = importlib.util.spec_from_file_location(f"seqmix_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise UserError(f"config file {path!r} has no get_config(arg=None) function")
  try:
    cfg = module.get_config(arg or None)
  except ValueError as e:  # configs reject a bad `:ARG` with a ValueError naming it
    raise UserError(f"{path}: {e}") from None
  for item in overrides:
    if "=" not in item:
      raise UserError(f"override {item!r} must look like KEY=VALUE")
    key, raw = item.split("=", 1)
    apply_override(cfg, key, raw)
  validate(cfg)
  cfg.lock()
  return cfg


def split_override_args(argv: list[str]) -> tuple[list[str], list[str]]:
  """Splits `--config.KEY=VALUE` (or `--config.KEY VALUE`) args out of argv."""
  rest, overrides = [], []
  i = 0
  while i < len(argv):
    a = argv[i]
    if a.startswith("--config."):
      body = a[len("--config."):]
      if "=" not in body:
        if i + 1 >= len(argv):
          raise UserError(f"override {a!r} has no value; write {a}=VALUE")
        body = f"{body}={argv[i + 1]}"
        i += 1
      overrides.append(body)
    else:
      rest.append(a)
    i += 1
  return rest, overrides


def _choice(key: str, value: Any, valid) -> None:
  if value not in valid:
    raise UserError(f"{key}={value!r} is not valid; choose one of: {', '.join(map(str, valid))}")


def _positive(key: str, value: Any, allow_zero: bool = False) -> None:
  if not isinstance(value, (int, float)) or value < 0 or (value == 0 and not allow_zero):
    raise UserError(f"{key}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Checks that need no devices: names, ranges and combinations."""
  # Imported here: configs must stay loadable without building models.
  from layers import mixers
  from trainer.data import tasks

  _choice("task.name", cfg.task.name, sorted(tasks.TASKS))
  entries = [n for n in cfg.model.mixer_schedule.split(",") if n.strip()]
  if len(entries) > cfg.model.num_layers:
    raise UserError(f"model.mixer_schedule={cfg.model.mixer_schedule!r} has {len(entries)} entries but "
                    f"model.num_layers={cfg.model.num_layers}, so its last entries would never be used")
  for i, name in enumerate(mixer_schedule(cfg)):
    if name not in mixers.MIXERS:
      where = "model.mixer" if not cfg.model.mixer_schedule else f"model.mixer_schedule[{i}]"
      raise UserError(f"{where}={name!r} is not a known mixer; valid mixers: {', '.join(sorted(mixers.MIXERS))}")
  for key in ("total_steps", "batch_size", "task.seq_len", "model.num_layers", "model.d_model",
              "model.num_heads", "eval_examples"):
    _positive(key, _get(cfg, key))
  for key in ("eval_every", "checkpoint_every", "log_every", "keep_checkpoints", "data.threads", "data.prefetch",
              "data.workers"):
    _positive(key, _get(cfg, key), allow_zero=True)
  _positive("optimizer.learning_rate", cfg.optimizer.learning_rate)
  _choice("optimizer.schedule", cfg.optimizer.schedule, ("cosine", "rsqrt", "constant"))
  _choice("model.positions", cfg.model.positions, ("rope", "learned", "none"))
  _choice("model.norm", cfg.model.norm, ("rmsnorm", "layernorm", "prepbn"))
  _choice("model.mlp", cfg.model.mlp, ("gelu", "swiglu"))
  _choice("model.pooling", cfg.model.pooling, ("mean", "cls"))
  _choice("model.dtype", cfg.model.dtype, ("float32", "bfloat16"))
  _choice("on_nonfinite", cfg.on_nonfinite, ("stop", "skip"))
  _choice("model.attention_impl", cfg.model.attention_impl, ("xla", "flash", "pallas", "cudnn", "mgpu", "auto"))
  impl = cfg.model.attention_impl
  if impl in ("cudnn", "mgpu"):
    import jax  # only here: the rest of the validation needs no backend

    if jax.default_backend() != "gpu":
      raise UserError(f"model.attention_impl={impl!r} needs an NVIDIA GPU, but this run's backend is "
                      f"{jax.default_backend()!r}; use 'auto' (Pallas on GPU/TPU, blockwise 'flash' elsewhere)")
    if cfg.model.dtype != "bfloat16":
      raise UserError(f"model.attention_impl={impl!r} takes 16-bit activations, but model.dtype="
                      f"{cfg.model.dtype!r}; set model.dtype=bfloat16")
  if impl == "mgpu":
    from kernels.flash_mgpu import HEAD_DIMS  # noqa: PLC0415

    if cfg.model.d_model % cfg.model.num_heads or cfg.model.d_model // cfg.model.num_heads not in HEAD_DIMS:
      raise UserError(f"model.attention_impl='mgpu' takes head dims {HEAD_DIMS}, but d_model={cfg.model.d_model} / "
                      f"num_heads={cfg.model.num_heads} is not one of them")
  _choice("parallel.sequence_strategy", cfg.parallel.sequence_strategy, ("auto", "ring", "all_to_all", "all_gather", "scan"))
  strategy = cfg.parallel.sequence_strategy
  for name in sorted(set(mixer_schedule(cfg))):
    leak = mixers.MIXERS[name].PACKING_LEAK
    if cfg.task.packing and leak:
      raise UserError(f"task.packing=true cannot train mixer {name!r}: {leak}, so packed examples would see each "
                      f"other; train it on unpacked rows (task.packing=false)")
    supported = mixers.MIXERS[name].SEQUENCE_STRATEGIES
    if strategy not in supported:
      raise UserError(f"parallel.sequence_strategy={strategy!r} is not available for mixer {name!r}; "
                      f"it supports: {', '.join(supported)}")
  if cfg.model.d_model % cfg.model.num_heads:
    raise UserError(f"model.d_model={cfg.model.d_model} is not divisible by model.num_heads={cfg.model.num_heads}")
  kv = cfg.model.num_kv_heads or cfg.model.num_heads
  if cfg.model.num_heads % kv:
    raise UserError(f"model.num_heads={cfg.model.num_heads} is not divisible by model.num_kv_heads={kv}")
  for axis in ("data", "fsdp", "tensor", "sequence"):
    size = cfg.mesh[axis]
    if not isinstance(size, int) or (size < 1 and size != -1):
      raise UserError(f"mesh.{axis}={size!r} must be a positive integer or -1 (all remaining devices)")
  if sum(1 for a in ("data", "fsdp", "tensor", "sequence") if cfg.mesh[a] == -1) > 1:
    raise UserError("at most one of mesh.data/fsdp/tensor/sequence may be -1")


def mixer_schedule(cfg: ml_collections.ConfigDict) -> list[str]:
  """Per-layer mixer names: `model.mixer_schedule` (comma separated, cycled; the entry `mixer`
  stands for `model.mixer`, e.g. "conv,mixer") or `model.mixer` in every layer."""
  if cfg.model.mixer_schedule:
    names = [n.strip() for n in cfg.model.mixer_schedule.split(",") if n.strip()]
    names = [cfg.model.mixer if n == "mixer" else n for n in names]
    return [names[i % len(names)] for i in range(cfg.model.num_layers)]
  return [cfg.model.mixer] * cfg.model.num_layers


def _get(cfg: ml_collections.ConfigDict, dotted: str) -> Any:
  node = cfg
  for p in dotted.split("."):
    node = node[p]
  return node
