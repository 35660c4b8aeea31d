"""Loading a config file, applying `--config.KEY=VALUE` overrides, and validating it.

Configs are Python files with `get_config(arg=None)`. Every user mistake here becomes a
`UserError` whose message is one sentence naming the bad value and what would be valid;
entry points print it without a traceback.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import math
import os
from typing import Any

import ml_collections


class UserError(Exception):
  """A mistake a person can make (config, data, checkpoint, mesh): reported in one sentence."""


def flatten(tree) -> dict:
  """{"model.d_model": 128, ...}: every leaf of a nested config (a ConfigDict or the dict of a
  saved config.json); an empty group has no leaves."""
  out = {}
  for k, v in tree.items():
    if hasattr(v, "items"):
      out.update({f"{k}.{kk}": vv for kk, vv in flatten(v).items()})
    else:
      out[k] = v
  return out


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
  if isinstance(current, (tuple, list)):
    if not isinstance(value, (tuple, list)):
      raise UserError(f"config key {key!r} takes a sequence like {current!r}, not {raw!r}")
    return type(current)(value)
  return value


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
    fields = list(node[last].keys())
    raise UserError(f"config key {key!r} is a group; set one of its fields" +
                    (f", e.g. {key}.{fields[0]}" if fields else " (it has none: entries are added in config files)"))
  with node.unlocked():
    node[last] = _parse_value(raw, node[last], key)


def run_get_config(spec: str, what: str = "config file", where: str = "configs live in configs/*.py"):
  """Runs `get_config(arg)` of the Python file `path.py[:arg]`; any failure is one sentence (UserError).

  Config files are Python code and run as such: load only files you trust."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise UserError(f"{what} {path!r} does not exist; {where}")
  mod_spec = importlib.util.spec_from_file_location(f"seqmix_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(mod_spec)
  try:
    mod_spec.loader.exec_module(module)
  except SyntaxError as e:
    raise UserError(f"{what} {path!r} line {e.lineno} has a syntax error: {e.msg}") from None
  except Exception as e:  # noqa: BLE001 - a config file is user code: any failure is theirs
    raise UserError(f"{what} {path!r} failed to load at line {_line_in(e, path)} "
                    f"({type(e).__name__}: {_first_line(e)})") from None
  if not callable(getattr(module, "get_config", None)):
    raise UserError(f"{what} {path!r} has no get_config(arg=None) function")
  try:
    return module.get_config(arg or None)
  except ValueError as e:  # configs reject a bad `:ARG` with a ValueError naming it
    raise UserError(f"{path}: {e}") from None
  except Exception as e:  # noqa: BLE001
    raise UserError(f"{what} {path!r}: get_config({arg or 'None'!s}) raised {type(e).__name__} at line "
                    f"{_line_in(e, path)} ({_first_line(e)})") from None


def load_config(spec: str, overrides: list[str] | tuple[str, ...] = ()) -> ml_collections.ConfigDict:
  """Loads `path.py[:arg]`, applies `KEY=VALUE` overrides, and validates the result.

  Config files are Python code and run as such: load only files you trust.
  """
  path = spec.partition(":")[0]
  cfg = run_get_config(spec)
  if not isinstance(cfg, ml_collections.ConfigDict):
    raise UserError(f"config file {path!r}: get_config returned {type(cfg).__name__}, not an "
                    f"ml_collections.ConfigDict; start from configs/base.py's get_config()")
  _check_complete(cfg, path)
  for item in overrides:
    if "=" not in item:
      raise UserError(f"override {item!r} must look like KEY=VALUE")
    key, raw = item.split("=", 1)
    apply_override(cfg, key, raw)
  keys = {item.split("=", 1)[0] for item in overrides}
  per_mixer = cfg.model.get("schedule_for", None)
  if ("model.mixer_schedule" in keys and per_mixer is not None and cfg.model.mixer in per_mixer
      and f"model.schedule_for.{cfg.model.mixer}" not in keys):
    with per_mixer.unlocked():  # a schedule given on the command line wins over the config file's layout
      del per_mixer[cfg.model.mixer]
  validate(cfg)
  cfg.lock()
  return cfg


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return text[0][:200] if text else "no message"


def _line_in(e: BaseException, path: str) -> str:
  """The line of `path` where exception `e` happened (the innermost frame in that file)."""
  import traceback  # noqa: PLC0415
  target = os.path.abspath(path)
  lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if os.path.abspath(f.filename) == target]
  return str(lines[-1]) if lines else "?"


def _check_complete(cfg: ml_collections.ConfigDict, path: str) -> None:
  """A config must hold every key configs/base.py defines (configs start from its get_config())."""
  base_path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "base.py")
  mod_spec = importlib.util.spec_from_file_location("seqmix_config_base_reference", base_path)
  module = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(module)
  have = set(_flat_keys(cfg))
  missing = [k for k in _flat_keys(module.get_config()) if k not in have]
  if missing:
    shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    raise UserError(f"config file {path!r}: get_config's result lacks {shown}; start from configs/base.py's "
                    f"get_config() and change what you need")


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
  if not isinstance(value, (int, float)) or value != value or value < 0 or (value == 0 and not allow_zero):
    raise UserError(f"{key}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


def _in_range(key: str, value: Any, low: float, high: float, high_open: bool = True) -> None:
  ok = isinstance(value, (int, float)) and low <= value and (value < high if high_open else value <= high)
  if not ok:
    raise UserError(f"{key}={value!r} must be in [{low:g}, {high:g}{')' if high_open else ']'}")


def _finite_numbers(cfg: ml_collections.ConfigDict, prefix: str = "") -> None:
  """No NaN or infinity anywhere in a config: no key has a use for one."""
  for k, v in cfg.items():
    if isinstance(v, ml_collections.ConfigDict):
      _finite_numbers(v, f"{prefix}{k}.")
    elif isinstance(v, float) and not math.isfinite(v):
      raise UserError(f"{prefix}{k}={v!r} is not a finite number")


MESH_AXES = ("data", "fsdp", "tensor", "sequence")


def _check_rules(rules: Any) -> None:
  """mesh.rules: a sequence of (logical axis, mesh axes) pairs; mesh axes None, one name, or a tuple of names."""
  example = "e.g. ((\"batch\", (\"data\", \"fsdp\")), (\"heads\", \"tensor\"))"
  if not isinstance(rules, (tuple, list)):
    raise UserError(f"mesh.rules={rules!r} must be a sequence of (logical axis, mesh axes) pairs, {example}")
  for rule in rules:
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
      raise UserError(f"mesh.rules entry {rule!r} must be a (logical axis, mesh axes) pair, {example}")
    axes = rule[1]
    names = () if axes is None else (axes,) if isinstance(axes, str) else axes
    if not isinstance(names, (tuple, list)) or any(not isinstance(a, str) or a not in MESH_AXES for a in names):
      raise UserError(f"mesh.rules entry {tuple(rule)!r} names mesh axes {axes!r}; valid mesh axes: "
                      f"{', '.join(MESH_AXES)} (a name, a tuple of names, or None)")


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Checks that need no devices: names, ranges and combinations."""
  # Imported here: configs must stay loadable without building models.
  from layers import mixers, remat
  from layers.attention import ops as attention_ops
  from parallel import sequence as sequence_lib
  from trainer.data import tasks

  _finite_numbers(cfg)
  _choice("task.name", cfg.task.name, sorted(tasks.TASKS))
  _choice("eval_split", cfg.eval_split, ("validation", "test"))  # held out: never "train"
  for name, schedule in (cfg.model.get("schedule_for", None) or {}).items():
    for entry in [name] + [e.strip() for e in str(schedule).split(",") if e.strip() and e.strip() != "mixer"]:
      if entry not in mixers.MIXERS:
        what = f"model.schedule_for.{name} names" if entry == name else f"model.schedule_for.{name}={schedule!r} holds"
        raise UserError(f"{what} no known mixer ({entry!r}); valid mixers: {', '.join(sorted(mixers.MIXERS))}")
  schedule, schedule_key = schedule_in_force(cfg)
  entries = [n for n in schedule.split(",") if n.strip()]
  if len(entries) > cfg.model.num_layers:
    raise UserError(f"{schedule_key}={schedule!r} has {len(entries)} entries but "
                    f"model.num_layers={cfg.model.num_layers}, so its last entries would never be used")
  for i, name in enumerate(mixer_schedule(cfg)):
    if name not in mixers.MIXERS:
      where = "model.mixer" if not schedule else f"{schedule_key}[{i % len(entries)}]"
      raise UserError(f"{where}={name!r} is not a known mixer; valid mixers: {', '.join(sorted(mixers.MIXERS))}")
  for key in ("total_steps", "batch_size", "logging.sample_tokens", "task.seq_len", "task.packing_window", "model.num_layers", "model.d_model",
              "model.num_heads", "model.mlp_ratio", "eval_examples", "optimizer.learning_rate", "optimizer.eps",
              "optimizer.grad_accum_steps"):
    _positive(key, _get(cfg, key))
  for key in ("seed", "eval_every", "checkpoint_every", "log_every", "keep_checkpoints", "max_skipped",
              "data.threads", "data.prefetch", "data.workers", "model.num_kv_heads", "optimizer.warmup_steps",
              "optimizer.grad_clip", "optimizer.weight_decay", "optimizer.end_lr_ratio", "model.prepbn.total_steps",
              "model.prepbn.warmup_steps", "logging.samples"):
    _positive(key, _get(cfg, key), allow_zero=True)
  if cfg.batch_size % cfg.optimizer.grad_accum_steps:
    raise UserError(f"batch_size={cfg.batch_size} is not divisible by optimizer.grad_accum_steps="
                    f"{cfg.optimizer.grad_accum_steps} (each micro-batch has batch_size / grad_accum_steps rows)")
  _in_range("model.dropout", cfg.model.dropout, 0.0, 1.0)
  _in_range("optimizer.b1", cfg.optimizer.b1, 0.0, 1.0)
  _in_range("optimizer.b2", cfg.optimizer.b2, 0.0, 1.0)
  _in_range("model.prepbn.r0", cfg.model.prepbn.r0, 0.0, 1.0, high_open=False)
  _choice("optimizer.schedule", cfg.optimizer.schedule, ("cosine", "rsqrt", "constant"))
  _choice("model.positions", cfg.model.positions, ("rope", "learned", "none"))
  _choice("model.norm", cfg.model.norm, ("rmsnorm", "layernorm", "prepbn"))
  _choice("model.mlp", cfg.model.mlp, ("gelu", "swiglu", "none"))
  _choice("model.pooling", cfg.model.pooling, ("mean", "cls"))
  _choice("model.dtype", cfg.model.dtype, ("float32", "bfloat16"))
  _choice("on_nonfinite", cfg.on_nonfinite, ("stop", "skip"))
  _choice("model.attention_impl", cfg.model.attention_impl, attention_ops.choices())
  _choice("model.remat", cfg.model.remat, remat.CHOICES)
  if cfg.model.d_model % cfg.model.num_heads:
    raise UserError(f"model.d_model={cfg.model.d_model} is not divisible by model.num_heads={cfg.model.num_heads}")
  reason = attention_ops.refusal(cfg.model.attention_impl, dtype=cfg.model.dtype,
                                 head_dim=cfg.model.d_model // cfg.model.num_heads)
  if reason:
    raise UserError(reason)
  _choice("parallel.sequence_strategy", cfg.parallel.sequence_strategy, sequence_lib.choices())
  for name in sorted(set(mixer_schedule(cfg))):
    leak = mixers.MIXERS[name].PACKING_LEAK
    if cfg.task.packing and leak:
      raise UserError(f"task.packing=true cannot train mixer {name!r}: {leak}, so packed examples would see each "
                      f"other; train it on unpacked rows (task.packing=false)")
  sequence_strategies(cfg)
  kv = cfg.model.num_kv_heads or cfg.model.num_heads
  if cfg.model.num_heads % kv:
    raise UserError(f"model.num_heads={cfg.model.num_heads} is not divisible by model.num_kv_heads={kv}")
  for axis in ("data", "fsdp", "tensor", "sequence"):
    size = cfg.mesh[axis]
    if not isinstance(size, int) or (size < 1 and size != -1):
      raise UserError(f"mesh.{axis}={size!r} must be a positive integer or -1 (all remaining devices)")
  if sum(1 for a in ("data", "fsdp", "tensor", "sequence") if cfg.mesh[a] == -1) > 1:
    raise UserError("at most one of mesh.data/fsdp/tensor/sequence may be -1")
  _check_rules(cfg.mesh.rules)
  profile_steps(cfg)
  if cfg.logging.wandb and importlib.util.find_spec("wandb") is None:
    raise UserError("logging.wandb=true needs the wandb package, which is not installed; install it with "
                    "pip install 'seqmix[tracking]', or leave logging.wandb=false")


def profile_steps(cfg: ml_collections.ConfigDict) -> tuple[int, int] | None:
  """`profile.steps="A:B"` as (A, B) with 0 <= A < B, or None when profiling is off."""
  text = cfg.profile.steps.strip()
  if not text:
    return None
  a, sep, b = text.partition(":")
  try:
    first, last = int(a), int(b)
  except ValueError:
    first = last = -1
  if not sep or first < 0 or last <= first:
    raise UserError(f"profile.steps={text!r} is not valid; write A:B with 0 <= A < B, e.g. 10:15 to trace "
                    f"train steps 11 to 15")
  return first, last


def sequence_strategies(cfg: ml_collections.ConfigDict) -> dict[str, str]:
  """{mixer name: sequence-parallel strategy} for the schedule's mixers (`parallel.sequence_strategy`
  as the default, `parallel.sequence_overrides` per mixer), or a UserError."""
  from layers import mixers  # noqa: PLC0415  (as in validate: configs load without the model code)
  from parallel import sequence as sequence_lib  # noqa: PLC0415

  names = sorted(set(mixer_schedule(cfg)))
  try:
    return sequence_lib.resolve(cfg.parallel.sequence_strategy, cfg.parallel.sequence_overrides,
                                {name: mixers.MIXERS[name] for name in names})
  except sequence_lib.SequenceParallelError as e:
    raise UserError(str(e)) from None


def schedule_in_force(cfg: ml_collections.ConfigDict) -> tuple[str, str]:
  """(the schedule string that applies, the key it comes from): `model.schedule_for.<mixer>`
  where the config has one for `model.mixer`, else `model.mixer_schedule`."""
  per_mixer = cfg.model.get("schedule_for", None) or {}
  if cfg.model.mixer in per_mixer:
    return str(per_mixer[cfg.model.mixer]), f"model.schedule_for.{cfg.model.mixer}"
  return cfg.model.mixer_schedule, "model.mixer_schedule"


def mixer_schedule(cfg: ml_collections.ConfigDict) -> list[str]:
  """Per-layer mixer names: the schedule in force (comma separated, cycled; the entry `mixer`
  stands for `model.mixer`, e.g. "conv,mixer") or `model.mixer` in every layer."""
  schedule, _ = schedule_in_force(cfg)
  if schedule:
    names = [n.strip() for n in schedule.split(",") if n.strip()]
    names = [cfg.model.mixer if n == "mixer" else n for n in names]
    return [names[i % len(names)] for i in range(cfg.model.num_layers)]
  return [cfg.model.mixer] * cfg.model.num_layers


def _get(cfg: ml_collections.ConfigDict, dotted: str) -> Any:
  node = cfg
  for p in dotted.split("."):
    node = node[p]
  return node


def describe_keys(base_path: str | None = None) -> list[tuple[str, Any, str]]:
  """(key, default, comment) for every key of configs/base.py, in its order: the comment on the
  key's line, else the comment lines just above it (for `--helpfull`)."""
  import io  # noqa: PLC0415
  import re  # noqa: PLC0415
  import tokenize  # noqa: PLC0415

  base_path = base_path or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                                        "base.py")
  with open(base_path) as f:
    source = f.read()
  comments = {tok.start[0]: tok.string.lstrip("#").strip()
              for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
  lines = source.splitlines()
  mod_spec = importlib.util.spec_from_file_location("seqmix_config_base_help", base_path)
  module = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(module)
  cfg = module.get_config()
  valid = set(_flat_keys(cfg))
  out, seen = [], set()
  for number, line in enumerate(lines, start=1):
    m = re.match(r"\s*c\.([\w.]+)\s*=", line)
    if not m or m.group(1) not in valid or m.group(1) in seen:  # the first assignment is get_config's
      continue
    key = m.group(1)
    seen.add(key)
    text = comments.get(number, "") if "#" in line else ""
    if not text:  # the comment block right above the assignment
      above, k = [], number - 1
      while k >= 1 and lines[k - 1].strip().startswith("#"):
        above.insert(0, comments.get(k, ""))
        k -= 1
      text = " ".join(above)
    out.append((key, _get(cfg, key), text))
  return out


def help_text() -> str:
  """Every config key, its default and what it does: the text of `--helpfull`."""
  rows = describe_keys()
  width = 44
  lines = ["Every config key (set with --config.KEY=VALUE; defaults from configs/base.py, which an experiment "
           "config may change):", ""]
  for key, value, text in rows:
    head = f"{key} = {value!r}"
    if not text:
      lines.append(f"  {head}")
    elif len(head) <= width:
      lines.append(f"  {head:<{width}}  {text}")
    else:  # a long default: the meaning goes on the next line
      lines += [f"  {head}", f"  {'':<{width}}  {text}"]
  return "\n".join(lines)

