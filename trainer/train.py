"""Train a config: `python -m trainer.train --config=configs/NAME.py[:ARG] --workdir=DIR [--config.KEY=VALUE ...]`.

Resumes from the newest readable checkpoint in DIR; if training is already complete it
only evaluates. `--dry_run` compiles the train step and reports per-device memory and
FLOPs (DIR/compile.json) without training. SIGTERM/SIGINT finish the current step, save
a checkpoint and exit 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import time

import jax
import numpy as np

from trainer import launch
from trainer import workdir as workdir_lib
from trainer.config import UserError, load_config, schedule_in_force, split_override_args
from trainer.workdir import check_workdir, write_json

log = logging.getLogger("seqmix")


class _HelpFull(argparse.Action):
  def __init__(self, option_strings, dest, **kwargs):
    super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

  def __call__(self, parser, namespace, values, option_string=None):
    from trainer.config import help_text  # noqa: PLC0415
    try:
      print(help_text(), flush=True)
    except BrokenPipeError:  # `--helpfull | head`: the reader left; say nothing more
      os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    parser.exit(0)


def parse_args(argv):
  parser = argparse.ArgumentParser(prog="python -m trainer.train", description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/default.py", help="configs/NAME.py[:ARG]")
  parser.add_argument("--workdir", default="runs/default", help="where checkpoints and metrics go")
  parser.add_argument("--dry_run", action="store_true", help="compile the train step only; write DIR/compile.json")
  parser.add_argument("--helpfull", action=_HelpFull, help="list every config key with its default and meaning")
  launch.add_flags(parser)
  rest, overrides = split_override_args(list(argv))
  args = parser.parse_args(rest)
  return args, overrides


class _Preemption:
  """Turns SIGTERM/SIGINT into a stop after a step, at the same step on every process.

  One process: handlers for both signals set a flag that `requested` reads after each step.

  Several processes: JAX's preemption sync point, with no per-step communication.
  `jax.distributed.initialize()` starts a preemption sync manager whose notifier installs a
  native SIGTERM handler (it only sets a flag, which a thread polls every second). A SIGTERM
  on any process is published through the coordination service; every process's manager then
  holds its lock (so its step cannot move), stores the last step given to
  `reached_preemption_sync_point`, waits at a barrier and takes the largest step + 1, which
  `reached_preemption_sync_point(step)` (a lock and a comparison) answers True for on every
  process. Hence:
  - SIGTERM is left to JAX's handler (a Python handler would replace it, and the manager would
    never hear of the signal);
  - SIGINT gets ours, which raises SIGTERM in this process for JAX's handler (so Ctrl-C
    stops every process, like SIGTERM); a second SIGINT raises KeyboardInterrupt at once;
  - the counter is the training step, and only this loop advances it: the checkpoint managers
    do not ask the sync point themselves (trainer/checkpoint.py `_Manager`; Orbax's would, from
    its finalize thread, with an older step);
  - a notice before the loop (during restore or compilation) is agreed on the manager's
    initial counter, 0, a step a resumed run never reaches; so `__enter__` registers the
    step the run starts from, then looks the notice up once in the coordination service and all-gathers
    the answer once: if any process saw it, every process stops after the first step.
  Fallback, several processes and no usable sync manager (`jax_enable_preemption_service`
  off, a jax without it, or a Python SIGTERM handler installed over JAX's): handlers for both
  signals, and an all-gather of the flags every `FALLBACK_EVERY` steps (the steps divisible by
  it, the same on every process), so a stop comes up to that many steps late.
  """

  FALLBACK_EVERY = 10
  _NOTICE_KEY = "RECEIVED_PREEMPTION_NOTICE"  # where JAX's manager publishes a notice

  def __init__(self, step: int = 0):
    self.signal = None  # the signal this process's handler saw
    self.mode = "local"  # "local" (one process), "sync" (JAX's sync point) or "allgather"
    self._start = step
    self._stop_first = False
    self._old = {}

  def __enter__(self):
    if jax.process_count() > 1:
      # One collective to agree: processes in different modes would run different collectives.
      from jax.experimental import multihost_utils  # noqa: PLC0415
      usable = multihost_utils.process_allgather(np.array(self._sync_point_usable()))
      self.mode = "sync" if bool(np.all(usable)) else "allgather"
    for sig in (signal.SIGINT,) if self.mode == "sync" else (signal.SIGTERM, signal.SIGINT):
      self._old[sig] = signal.signal(sig, self._handle)
    if self.mode == "sync":
      self._stop_first = self._notice_before_start()
    return self

  def _sync_point_usable(self) -> bool:
    from jax.experimental import multihost_utils  # noqa: PLC0415
    try:
      multihost_utils.reached_preemption_sync_point(self._start)  # registers the step we start from
    except (AttributeError, RuntimeError):  # no such function, or no manager
      return False
    # Python never installed a SIGTERM handler, so the native one (JAX's) is in place.
    return not callable(signal.getsignal(signal.SIGTERM))

  def _notice_before_start(self) -> bool:
    from jax.experimental import multihost_utils  # noqa: PLC0415
    state = getattr(sys.modules.get("jax._src.distributed"), "global_state", None)
    try:
      seen = bool(state.client.key_value_try_get(self._NOTICE_KEY))
    except Exception:  # noqa: BLE001 -- not found (the usual case), or no such client method
      seen = False
    return bool(np.any(multihost_utils.process_allgather(np.array(seen))))

  def _handle(self, signum, frame):
    del frame
    if self.signal is not None and signum == signal.SIGINT:  # a second Ctrl-C: stop now
      raise KeyboardInterrupt
    self.signal = signal.Signals(signum).name
    if self.mode == "sync":  # JAX's notifier listens for SIGTERM only
      signal.raise_signal(signal.SIGTERM)

  def requested(self, step: int) -> bool:
    """After train step `step`: whether to save and stop now (the same answer on every process)."""
    if self.mode == "local":
      return self.signal is not None
    from jax.experimental import multihost_utils  # noqa: PLC0415
    if self.mode == "sync":
      return bool(multihost_utils.reached_preemption_sync_point(step)) or self._stop_first
    if step % self.FALLBACK_EVERY:
      return False
    return bool(np.any(multihost_utils.process_allgather(np.array(self.signal is not None))))

  @property
  def reason(self) -> str:
    if self.signal is not None:
      return self.signal
    return "SIGTERM" if self.mode == "sync" else "a signal on another process"

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


def _print(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


def run(args, overrides) -> int:
  # Heavy imports after argument parsing so `--help` and config errors are instant.
  from trainer.experiment import Experiment

  launch.initialize(args)
  cfg = load_config(args.config, overrides)
  exp = Experiment(cfg, args.workdir, read_only=args.dry_run)

  if args.dry_run:
    check_workdir(args.workdir)  # it writes compile.json
    stats = exp.compile_stats()
    if jax.process_index() == 0:
      write_json(os.path.join(args.workdir, "compile.json"), stats)
      print(f"compiled train step on {stats['num_devices']} device(s), {exp.num_params:,} params, "
            f"model.remat={cfg.model.remat}, model.scan_blocks={str(cfg.model.scan_blocks).lower()}; per device: "
            f"arguments {_mib(stats['argument_bytes'])}, outputs {_mib(stats['output_bytes'])}, "
            f"temporaries {_mib(stats['temp_bytes'])}, total {_mib(stats['total_bytes'])}; "
            f"{stats['flops_per_step']:.3e} FLOPs per step -> {os.path.join(args.workdir, 'compile.json')}")
    return 0

  # Every way out finishes (or removes) pending saves and releases the workdir, and a disk that
  # refuses a write is reported once, as a sentence.
  failed = True
  # Waiting for saves after a failure is safe when every process fails at the same point (one
  # process; a non-finite loss, which all processes see in the same replicated metrics).
  # Otherwise the peers may be blocked in a collective, so a multi-process job leaves at once.
  symmetric = jax.process_count() == 1
  try:
    with workdir_lib.quiet_disk_full_noise():
      try:
        code = _train(exp, args, overrides, cfg)
        exp.checkpointer.wait()
        failed = False
        return code
      except _NonFinite:
        symmetric = True
        raise
      except Exception as e:
        if workdir_lib.disk_full(e):
          last = exp.checkpointer.last_good_after_wait() if symmetric else exp.checkpointer.last_good()
          raise workdir_lib.io_fault(e, args.workdir, last) from None
        raise
      finally:
        if failed and symmetric:
          _finish_saves_after_failure(exp)
  finally:
    if failed:
      if symmetric:
        _close_quietly(exp)
        exp.checkpointer.remove_unfinished()  # a save the close abandoned: not left half-written
      elif exp.lock is not None:
        exp.lock.release()
    else:
      exp.close()


def _finish_saves_after_failure(exp) -> None:
  """After a failure: saves already under way are finished if they can be (they hold finite
  states: see Checkpointer.save); a save the disk refused is removed, not left half-written."""
  try:
    exp.checkpointer.wait()
  except Exception:  # noqa: BLE001 - the failure being reported is the one that matters
    pass
  exp.checkpointer.remove_unfinished()


def _close_quietly(exp) -> None:
  try:
    exp.close()
  except Exception:  # noqa: BLE001
    if exp.lock is not None:
      exp.lock.release()


class _Profiler:
  """jax.profiler traces of train steps A+1..B (`profile.steps="A:B"`) into DIR/profile, for
  TensorBoard's profile plugin (`tensorboard --logdir DIR/profile`) or Perfetto; process 0 only
  unless `profile.all_processes` (then DIR/profile/process_<i>)."""

  def __init__(self, cfg, workdir: str, start: int):
    from trainer.config import profile_steps  # noqa: PLC0415
    span = profile_steps(cfg)
    traced = jax.process_index() == 0 or cfg.profile.all_processes
    self.span = span if span and span[1] > start and traced else None
    self.dir = os.path.join(workdir, "profile")
    if cfg.profile.all_processes and jax.process_count() > 1:
      self.dir = os.path.join(self.dir, f"process_{jax.process_index()}")
    self.memory = cfg.profile.memory
    self.active = False

  def before(self, done: int) -> None:
    """Called with the number of steps done, before the next one runs."""
    if self.span and not self.active and self.span[0] <= done < self.span[1]:
      jax.profiler.start_trace(self.dir)
      self.active = True

  def after(self, done: int, state) -> None:
    if self.active and done >= self.span[1]:
      jax.block_until_ready(state)
      if self.memory:
        os.makedirs(self.dir, exist_ok=True)
        jax.profiler.save_device_memory_profile(os.path.join(self.dir, f"memory_after_step_{done}.prof"))
      self.close()
      _print(f"profile of train steps {self.span[0] + 1}-{done} written to {self.dir}")
      self.span = None

  def close(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False


class _NonFinite(UserError):
  """Training produced a non-finite loss (stop) or too many skipped steps (skip)."""


def _train(exp, args, overrides, cfg) -> int:
  from trainer.metrics import MetricsWriter

  main = jax.process_index() == 0
  t_begin = time.time()  # goodput's denominator: restore and compilation count as time not training
  state, meta = exp.restore_or_init()
  start = int(jax.device_get(state["step"]))
  resumed = meta is not None
  writer = MetricsWriter(args.workdir, main, resume_step=start, tracking=cfg)
  try:
    if main:
      cfg_path = os.path.join(args.workdir, "config.json")
      if not os.path.exists(cfg_path):
        write_json(cfg_path, json.loads(cfg.to_json()))
      elif resumed:
        write_json(os.path.join(args.workdir, f"config_resumed_at_{start}.json"), json.loads(cfg.to_json()))
    code = _train_loop(exp, args, overrides, cfg, state, start, resumed, writer, t_begin)
    writer.close()
    return code
  finally:
    writer.close(failed=True)  # on failures (a no-op after the close above): TensorBoard's exit hook
    # must find nothing left to flush, and W&B marks the run failed


def _train_loop(exp, args, overrides, cfg, state, start, resumed, writer, t_begin) -> int:
  from trainer.checkpoint import NonFiniteState
  from trainer.metrics import ProgressBar

  main = jax.process_index() == 0
  if exp.config_changes:
    writer.write(start, {"config_change": exp.config_changes})
  chance = exp.task.spec
  _, schedule_key = schedule_in_force(cfg)
  layout = f" (layout from {schedule_key})" if schedule_key != "model.mixer_schedule" else ""
  _print(f"seqmix: task {cfg.task.name} ({chance.kind}), mixers {','.join(exp.spec.mixers)}{layout}, "
         f"{exp.num_params:,} params, mesh {dict(exp.mesh.shape)}, {jax.process_count()} process(es)")

  if start >= cfg.total_steps:
    _print(f"training is already complete ({start}/{cfg.total_steps} steps in {args.workdir}); evaluating only")
    result = exp.evaluate(state, cfg.eval_split)
    writer.write(start, {f"eval/{k.split('/', 1)[1]}": v for k, v in result.items()})
    _summary(exp, args, overrides, cfg, result, start, None)
    if cfg.eval_best_at_end:
      _eval_best(exp, args, cfg, writer, start)
    writer.close()
    return 0
  if resumed:
    _print(f"resuming from step {start} (checkpoint in {exp.checkpointer.root})")

  t_compile = time.time()
  train_step = exp.compiled_train_step()
  stats = exp.compile_stats()
  compile_seconds = time.time() - t_compile
  writer.write(start, {f"compile/{k}": v for k, v in stats.items()} | {"compile/seconds": compile_seconds})
  peak = _peak_flops(jax.devices()[0])
  sampler = None
  if cfg.logging.samples and exp.task.spec.kind != "lm":
    _print(f"logging.samples={cfg.logging.samples}: task {cfg.task.name!r} is not a causal LM, so no samples")
  if cfg.logging.samples and exp.task.spec.kind == "lm":
    from trainer.generate import EvalSamples  # noqa: PLC0415
    sampler = EvalSamples(exp, cfg.logging.samples, cfg.logging.sample_tokens)
    if sampler.fn is None:
      _print(sampler.reason + "; training goes on without them")
      sampler = None

  bar = ProgressBar(cfg.total_steps, start, main and cfg.progress_bar)
  last_eval: dict | None = None
  step = start
  stopped_by = None
  pending = None  # (step, metrics): fetched one step late so the host runs ahead of the device
  # Throughput counts train steps alone: each log window's wall time less what was spent on
  # evaluation and checkpoints (each logged as its own time). Before those, the loop waits for
  # the steps already dispatched, so their time stays with training.
  clock = {"eval": 0.0, "checkpoint": 0.0, "profile": 0.0}
  totals = {"train": 0.0, "tokens": 0.0, "steps": 0}
  stream = exp.train_stream(start)
  profiler = _Profiler(cfg, args.workdir, start)
  window = {"t": time.time(), "steps": 0, "tokens": 0.0, "other": 0.0, "wait": 0.0}

  def check(item):
    s, m = item
    values = jax.device_get({k: m[k] for k in ("loss", "tokens", "consecutive_skipped") if k in m})
    window["tokens"] += float(values.get("tokens", 0.0))
    try:
      _check_finite((s, values), cfg)
    except _NonFinite as e:
      raise _NonFinite(f"{e}; {exp.checkpointer.last_good_after_wait()}") from None

  def timed(what, fn, *a):
    jax.block_until_ready(state)  # the steps in flight are training time, not `what`'s
    t = time.time()
    try:
      return fn(*a)
    finally:
      clock[what] += time.time() - t
      window["other"] += time.time() - t

  def save(fn, *a):
    nonlocal pending
    if pending is not None:  # a checkpoint never holds the update of a step not yet checked
      check(pending)
      pending = None
    try:
      timed("checkpoint", fn, step, state, *a)
    except NonFiniteState as e:
      raise _NonFinite(f"the train state holds NaN or inf after step {step} (in {', '.join(e.arrays[:3])}"
                       f"{', ...' if len(e.arrays) > 3 else ''}), so it was not saved; "
                       f"{exp.checkpointer.last_good_after_wait()}; lower optimizer.learning_rate") from None

  def close_window():
    """(wall seconds, train-step seconds, data-wait seconds) of the window now ending; a new one starts.

    Waits for data stay in the train-step time: the device is usually still running the
    step before while the loop waits, so subtracting them would overstate throughput. A
    data-bound run shows in `train/data_wait_fraction` instead."""
    dt = time.time() - window["t"]
    wait = stream.wait_seconds - window["wait"]
    train_s = max(dt - window["other"], 1e-9)
    totals["train"] += train_s
    totals["tokens"] += window["tokens"]
    totals["steps"] += window["steps"]
    return dt, train_s, wait

  def log_row(values):
    dt, train_s, wait = close_window()
    row = {f"train/{k}": v for k, v in values.items()}
    row |= {"train/tokens_per_sec": window["tokens"] / train_s,  # real (non-padding) tokens
            "train/steps_per_sec": window["steps"] / train_s,
            "train/step_seconds": train_s / max(window["steps"], 1),
            # Share of the window's wall time the loop sat waiting for the input pipeline.
            "train/data_wait_fraction": wait / max(dt, 1e-9),
            "time/train_seconds": totals["train"], "time/eval_seconds": clock["eval"],
            "time/checkpoint_seconds": clock["checkpoint"], "time/data_wait_seconds": stream.wait_seconds}
    if peak and stats["flops_per_step"]:
      row["train/mfu"] = stats["flops_per_step"] * window["steps"] / train_s / peak
    writer.write(step, row)
    bar.update(step, values["loss"], row["train/tokens_per_sec"])
    window.update(t=time.time(), steps=0, tokens=0.0, other=0.0, wait=stream.wait_seconds)

  try:
    with _Preemption(step) as preempt:
      while step < cfg.total_steps:
        profiler.before(step)
        batch = next(stream)
        state, metrics = train_step(state, batch)
        step += 1
        window["steps"] += 1
        if pending is not None:
          check(pending)
        pending = (step, metrics)
        if profiler.active and step >= profiler.span[1]:
          timed("profile", profiler.after, step, state)  # writing the trace is not train time
        if step % max(cfg.log_every, 1) == 0 or step == cfg.total_steps:
          values = {k: float(v) for k, v in jax.device_get(metrics).items()}
          pending = None
          check((step, values))
          log_row(values)
        do_eval = step == cfg.total_steps or (cfg.eval_every and step % cfg.eval_every == 0)
        if do_eval:
          result = timed("eval", exp.evaluate, state, cfg.eval_split)
          last_eval = result
          writer.write(step, {f"eval/{k.split('/', 1)[1]}": v for k, v in result.items()})
          if sampler is not None:
            writer.samples(step, timed("eval", sampler, state))
          save(exp.checkpointer.save_best, exp.meta(step, result), result[f"{cfg.eval_split}/accuracy"])
        if step == cfg.total_steps or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
          save(exp.checkpointer.save, exp.meta(step, last_eval))
        if preempt.requested(step):
          stopped_by = preempt.reason
          if not (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
            save(exp.checkpointer.save, exp.meta(step, last_eval))
          break
      if pending is not None:
        check(pending)
  finally:
    t_close = time.time()
    profiler.close()
    stream.close()  # the pipeline's threads or worker processes, on every way out
    bar.close()
    window["other"] += time.time() - t_close
  timed("checkpoint", exp.checkpointer.wait)
  if window["steps"]:  # steps after the last log point (a stop between them)
    close_window()
  wall = time.time() - t_begin
  timing = {"time/wall_seconds": wall, "time/compile_seconds": compile_seconds, "time/train_seconds": totals["train"],
            "time/eval_seconds": clock["eval"], "time/checkpoint_seconds": clock["checkpoint"],
            "time/data_wait_seconds": stream.wait_seconds, "time/goodput": totals["train"] / max(wall, 1e-9),
            "time/tokens_per_sec": totals["tokens"] / max(totals["train"], 1e-9)}
  writer.write(step, timing)
  if stopped_by:
    _print(f"stopped by {stopped_by} after step {step}; checkpoint saved in {exp.checkpointer.root}; "
           f"run the same command again to resume")
    writer.close()
    return 0
  _summary(exp, args, overrides, cfg, last_eval, step, wall, timing)
  if last_eval:
    writer.hparams(cfg, last_eval, step)
  if cfg.eval_best_at_end:
    _eval_best(exp, args, cfg, writer, step)
  writer.close()
  return 0


def _eval_best(exp, args, cfg, writer, step: int) -> None:
  """`eval_best_at_end`: the best checkpoint (by `eval_split`) on validation and test, after training.

  Written as `best/*` in metrics.jsonl at the final step and to DIR/eval_results.json (what
  `trainer.evaluate --best` writes). Not part of the run's train or goodput time."""
  restored = exp.checkpointer.restore_best(exp.abstract_state, check_config=exp.check_config)
  if restored is None:
    _print(f"eval_best_at_end: no readable best checkpoint in {args.workdir} (keep_best={cfg.keep_best}); skipped")
    return
  state, _ = restored
  best = int(jax.device_get(state["step"]))
  t = time.time()
  result = {"step": best, "task": cfg.task.name, "seq_len": exp.task.spec.seq_len,
            "chance_accuracy": exp.task.spec.chance, "chance_note": exp.task.spec.chance_note}
  for split in ("validation", "test"):
    result.update(exp.evaluate(state, split))
  writer.write(step, {"best/step": best, "best/seconds": time.time() - t}
               | {f"best/{k}": v for k, v in result.items() if "/" in k})
  if jax.process_index() == 0:
    write_json(os.path.join(args.workdir, "eval_results.json"), result)
  _print(f"best checkpoint (step {best}, by {cfg.eval_split} accuracy): validation accuracy "
         f"{result['validation/accuracy']:.4f}, test accuracy {result['test/accuracy']:.4f} "
         f"-> {os.path.join(args.workdir, 'eval_results.json')}")


def _check_finite(pending, cfg) -> None:
  step, metrics = pending
  loss = float(metrics["loss"])
  if not math.isfinite(loss) and cfg.on_nonfinite == "stop":
    raise _NonFinite(f"the training loss became {loss} at step {step}; lower optimizer.learning_rate, or set "
                     f"on_nonfinite=skip to skip such steps")
  if cfg.on_nonfinite == "skip" and cfg.max_skipped and "consecutive_skipped" in metrics:
    run = int(float(metrics["consecutive_skipped"]))
    if run >= cfg.max_skipped:
      raise _NonFinite(f"on_nonfinite=skip skipped {run} consecutive steps (steps {step - run + 1} to {step}) whose "
                       f"gradients were not finite, reaching max_skipped={cfg.max_skipped}; lower "
                       f"optimizer.learning_rate or raise max_skipped")


def _mib(n: int) -> str:
  return f"{n / 2**20:.1f} MiB"


def _peak_flops(device) -> float | None:
  """Dense bf16 peak per device, for the MFU estimate (None where unknown, e.g. CPU)."""
  kind = getattr(device, "device_kind", "").lower()
  table = {"h100": 989e12, "h200": 989e12, "a100": 312e12, "v5e": 197e12, "v5p": 459e12, "v4": 275e12,
           "v6": 918e12}
  return next((v for k, v in table.items() if k in kind), None)


def _summary(exp, args, overrides, cfg, result, step, wall, timing=None) -> None:
  from trainer.metrics import format_duration
  spec = exp.task.spec
  split = cfg.eval_split
  lines = ["", f"== seqmix summary: {cfg.task.name}, {step} steps" + (f" in {format_duration(wall)}" if wall else "")]
  if result:
    lines.append(f"held-out ({split}, {result[f'{split}/examples']} examples): accuracy "
                 f"{result[f'{split}/accuracy']:.4f}, loss {result[f'{split}/loss']:.4f}"
                 + (f", {result[f'{split}/bits_per_token']:.3f} bits/token" if f"{split}/bits_per_token" in result
                    else ""))
    lines.append(f"chance: accuracy {spec.chance:.4f} ({spec.chance_note})")
  if timing:
    d = format_duration
    lines.append(f"time: {timing['time/goodput']:.0%} of it in train steps ({d(timing['time/train_seconds'])}, "
                 f"{timing['time/tokens_per_sec']:,.0f} real tokens/s); compile {d(timing['time/compile_seconds'])}, "
                 f"evaluation {d(timing['time/eval_seconds'])}, checkpoints {d(timing['time/checkpoint_seconds'])}, "
                 f"waiting for data {d(timing['time/data_wait_seconds'])}")
  lines.append(f"checkpoints: {exp.checkpointer.root}   logs: {os.path.join(args.workdir, 'metrics.jsonl')}")
  kept = " ".join(f"--config.{o}" for o in overrides if not o.startswith("total_steps="))
  base = f"--config={args.config} --workdir={args.workdir}" + (f" {kept}" if kept else "")
  lines.append(f"resume:   python -m trainer.train {base} --config.total_steps=N  (N > {step})")
  lines.append(f"evaluate: python -m trainer.evaluate {base}")
  _print("\n".join(lines))


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  return launch.run_entry(lambda: run(*parse_args(argv)))

if __name__ == "__main__":
  code = main()
  if code == workdir_lib.EXIT_IO:
    # The disk refused a write: saves were finished or removed and the workdir released, but the
    # checkpoint library's background threads may still be failing; leave without waiting for
    # them (and their tracebacks) at interpreter shutdown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
  sys.exit(code)
