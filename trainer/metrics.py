"""metrics.jsonl (one JSON object per event, always with `step`), TensorBoard events
when tensorboardX is installed, Weights & Biases when asked (`logging.wandb`), and the
one-line progress bar. Only process 0 writes."""

from __future__ import annotations

import errno
import json
import math
import os
import secrets
import sys
import time

from trainer.config import flatten as _flatten


class MetricsWriter:
  """Appends whole lines to DIR/metrics.jsonl: a write the disk refuses half way is cut back
  to the last complete line before the error propagates, so the file stays valid JSON lines.

  `resume_step`: the step this run starts from. Rows of steps after `resume_step` (written
  by a run that stopped before its next checkpoint, and about to be trained again) and any
  torn line (a kill mid-write) move to DIR/metrics_superseded.jsonl, so every train step
  appears once in metrics.jsonl and every line of it is valid JSON.
  """

  def __init__(self, workdir: str, enabled: bool, resume_step: int | None = None, tracking=None):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb = None
    self.wandb = None
    if enabled:
      if resume_step is not None and os.path.exists(self.path):
        self._truncate_after(resume_step)
      try:
        from tensorboardX import SummaryWriter  # optional: event files for TensorBoard
        self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      except (ImportError, OSError):
        self.tb = None
      if tracking is not None and tracking.logging.wandb:
        try:
          self.wandb = open_wandb_run(tracking, workdir)
        except Exception as e:  # noqa: BLE001 - no login, a bad entity, no network: one sentence
          self.close()
          from trainer.config import UserError  # noqa: PLC0415
          reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
          raise UserError(f"logging.wandb=true: Weights & Biases could not start a run ({reason}); log in "
                          f"(wandb login), set WANDB_MODE=offline, or set logging.wandb=false") from None

  def _truncate_after(self, step: int) -> None:
    with open(self.path, "rb") as f:
      raw = f.read()
    keep, superseded = [], []
    for line in raw.split(b"\n"):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
        ok = isinstance(row, dict) and int(row.get("step", 0)) <= step
      except (ValueError, TypeError):  # a torn line of a killed writer: kept aside, not lost
        ok = False
      (keep if ok else superseded).append(line)
    text = b"".join(x + b"\n" for x in keep)
    if text == raw:
      return
    if superseded:
      with open(os.path.join(os.path.dirname(self.path), "metrics_superseded.jsonl"), "ab") as f:
        f.write(b"".join(x + b"\n" for x in superseded))
    tmp = self.path + ".tmp"
    try:
      with open(tmp, "wb") as f:
        f.write(text)
      os.replace(tmp, self.path)
    except BaseException:
      if os.path.exists(tmp):
        os.remove(tmp)
      raise

  def write(self, step: int, values: dict) -> None:
    if not self.enabled:
      return
    clean = {k: (float(v) if isinstance(v, (int, float)) or hasattr(v, "item") else v) for k, v in values.items()}
    line = (json.dumps({"step": int(step), **clean}) + "\n").encode()
    fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
      size = os.fstat(fd).st_size
      try:
        written = os.write(fd, line)
        if written != len(line):  # a short write: the disk filled up mid-line
          raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.path)
      except OSError as e:
        os.ftruncate(fd, size)  # never leave half a line for the next record to be glued to
        if e.filename is None:
          raise OSError(e.errno, e.strerror, self.path) from None
        raise
    finally:
      os.close(fd)
    if self.tb is not None:
      try:
        for k, v in clean.items():
          if isinstance(v, float) and math.isfinite(v):
            self.tb.add_scalar(k, v, int(step))
        self.tb.flush()
      except OSError:  # the event files are a convenience; metrics.jsonl is the record
        self._abandon_tb()
    if self.wandb is not None:
      numbers = {k: v for k, v in clean.items() if isinstance(v, float) and math.isfinite(v)}
      if numbers:  # plotted against our step (see open_wandb_run), so nothing is dropped on resume
        self.wandb.log({"step": int(step), **numbers})

  def samples(self, step: int, samples: list[dict]) -> None:
    """Sampled continuations (trainer.generate.EvalSamples): one metrics.jsonl row, TensorBoard
    text, a W&B table."""
    if not self.enabled:
      return
    self.write(step, {"samples": samples})
    if self.tb is not None:
      try:
        for i, s in enumerate(samples):
          self.tb.add_text(f"samples/{i}", f"**{s['prompt']!r}** {s['continuation']!r}", int(step))
        self.tb.flush()
      except OSError:
        self._abandon_tb()
    if self.wandb is not None:
      import wandb  # noqa: PLC0415
      table = wandb.Table(columns=["prompt", "continuation"], data=[[s["prompt"], s["continuation"]] for s in samples])
      self.wandb.log({"step": int(step), "samples": table})

  def hparams(self, cfg, metrics: dict, step: int) -> None:
    """The run's settings beside its final held-out metrics, for TensorBoard's HParams tab
    (one session per invocation, under tensorboard/hparams)."""
    if self.tb is None:
      return
    values = {k: v for k, v in _flatten(cfg).items() if isinstance(v, (bool, int, float, str))}
    scores = {f"hparams/{k}": float(v) for k, v in metrics.items()
              if isinstance(v, (int, float)) and math.isfinite(float(v))}
    try:
      self.tb.add_hparams(values, scores, name="hparams", global_step=int(step))
    except OSError:
      self._abandon_tb()

  def close(self, failed: bool = False) -> None:
    """`failed`: the run ended by an error (W&B marks the run failed, not finished)."""
    if self.tb is not None:
      try:
        self.tb.close()
      except OSError:
        self._abandon_tb()
      self.tb = None
    if self.wandb is not None:
      run, self.wandb = self.wandb, None
      run.finish(exit_code=1 if failed else 0)

  def _abandon_tb(self) -> None:
    """Gives up on the TensorBoard event files after the disk refused them: marks the writers
    closed so their exit hook does not try (and fail, with a traceback) to flush again."""
    tb, self.tb = self.tb, None
    for fw in (getattr(tb, "all_writers", None) or {}).values():
      ew = getattr(fw, "event_writer", None)
      if ew is not None:
        ew._closed = True  # noqa: SLF001 - tensorboardX offers no way to drop pending events


WANDB_RUN_FILE = "wandb_run.json"


def open_wandb_run(cfg, workdir: str):
  """A Weights & Biases run for this workdir: the id is made on the first start and kept in
  DIR/wandb_run.json, so every resumed invocation continues the same run. Its config is the
  flat config; its files go under DIR/wandb (`WANDB_MODE=offline` works without network,
  `wandb sync DIR/wandb/offline-run-*` uploads later). Every row is logged with our `step` as
  the x axis, not W&B's own counter: after a resume, the steps trained again since the last
  checkpoint are logged again (W&B would drop rows at a step below its counter)."""
  import wandb  # noqa: PLC0415 - optional (pip install 'seqmix[tracking]'); config.validate checks it

  from trainer.workdir import write_json  # noqa: PLC0415
  path = os.path.join(workdir, WANDB_RUN_FILE)
  if os.path.exists(path):
    with open(path) as f:
      run_id = json.load(f)["id"]
  else:
    run_id = secrets.token_hex(4)  # W&B ids: short, lowercase letters and digits
    write_json(path, {"id": run_id})
  run = wandb.init(project=cfg.logging.wandb_project, entity=cfg.logging.wandb_entity or None,
                   name=cfg.logging.wandb_name or os.path.basename(os.path.abspath(workdir)), id=run_id,
                   resume="allow", dir=workdir, config=_flatten(cfg))
  run.define_metric("step")
  run.define_metric("*", step_metric="step")
  return run


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ProgressBar:
  """`[####....] step 120/600 loss 1.83 12.3k tok/s ETA 3:10` on stderr.

  Redraws in place on a terminal; elsewhere (CI, log files) prints a line every ~10%.
  """

  def __init__(self, total: int, start: int, enabled: bool, width: int = 24):
    self.total, self.start, self.enabled, self.width = total, start, enabled, width
    self.tty = sys.stderr.isatty()
    self.t0 = time.time()
    self.last_line_step = start

  def update(self, step: int, loss: float, tokens_per_sec: float) -> None:
    if not self.enabled:
      return
    done = step - self.start
    rate = done / max(time.time() - self.t0, 1e-9)
    eta = (self.total - step) / rate if rate > 0 else float("nan")
    frac = step / max(self.total, 1)
    bar = "#" * int(frac * self.width) + "." * (self.width - int(frac * self.width))
    tps = f"{tokens_per_sec / 1000:.1f}k" if tokens_per_sec >= 1000 else f"{tokens_per_sec:.0f}"
    line = (f"[{bar}] step {step}/{self.total} loss {loss:.4f} {tps} tok/s "
            f"ETA {format_duration(eta) if math.isfinite(eta) else '?'}")
    if self.tty:
      sys.stderr.write("\r" + line + "   ")
      sys.stderr.flush()
    elif step - self.last_line_step >= max(self.total // 10, 1) or step == self.total:
      self.last_line_step = step
      print(line, file=sys.stderr, flush=True)

  def close(self) -> None:
    if self.enabled and self.tty:
      sys.stderr.write("\n")
      sys.stderr.flush()
