"""The run directory: one writer at a time, atomic files, and I/O faults as one sentence.

* `WorkdirLock`: an exclusive `flock` on `DIR/.seqmix.lock`, held for the trainer's life
  (by process 0 of a multi-process run) and released by the OS when the process dies, so
  a killed run never blocks the next one. A second trainer on the same directory is
  refused with the holder's PID, host and start time. Once the lock is held, temporary
  checkpoint directories a dead writer left behind are removed.
* `write_json`: whole files or nothing (written beside the target, then renamed).
* `IOFault`: a full disk (or quota, or a read-only file system) while writing, reported
  as one sentence naming the device and path, with its own exit code (`EXIT_IO`).
  `quiet_disk_full_noise` keeps the checkpoint library's background threads from printing
  pages of tracebacks about the same fault.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import time

from trainer.config import UserError

log = logging.getLogger("seqmix")

LOCK_NAME = ".seqmix.lock"
EXIT_IO = 75  # sysexits' EX_TEMPFAIL: the run can continue once space is freed; 2 stays "bad input"
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
_FULL_MARKERS = ("No space left on device", "os_error_code='28'", "Disk quota exceeded", "os_error_code='122'",
                 "Read-only file system", "os_error_code='30'")


class IOFault(UserError):
  """The disk refused a write (full, over quota, read-only): one sentence, exit code EXIT_IO."""


def check_workdir(workdir: str) -> None:
  """Fails (touching nothing there) unless `workdir` can be created and written."""
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write-test-"):
      pass
  except OSError as e:
    raise UserError(f"--workdir={workdir!r} is not writable ({e.strerror or type(e).__name__}); "
                    f"choose a directory you can write to") from None


def write_json(path: str, obj) -> None:
  """Writes `path` whole or not at all: a failed write leaves the old file and no temporary."""
  tmp = f"{path}.tmp"
  try:
    with open(tmp, "w") as f:
      json.dump(obj, f, indent=2, sort_keys=True)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException as e:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    if isinstance(e, OSError) and not e.filename:  # a failed write() names no file: name it
      raise OSError(e.errno, e.strerror, path) from None
    raise


# -- the lock ----------------------------------------------------------------------------


class WorkdirLock:
  """Exclusive use of a run directory by one trainer (see the module docstring)."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_NAME)
    self.fd: int | None = None
    self.announced = False

  def try_acquire(self) -> str | None:
    """Takes the lock; returns None, or the sentence refusing this trainer. On a file system
    without locks (some NFS and Lustre mounts) it warns and goes on unlocked."""
    try:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      return (f"--workdir={self.workdir!r}: cannot open its lock file {self.path} ({e.strerror}); "
              f"make it writable or choose another --workdir")
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
        os.close(fd)
        log.warning("the file system of %s does not support locks (%s); nothing stops a second trainer from "
                    "using this workdir at the same time", self.workdir, e.strerror)
        return None
      holder = _read_holder(fd)
      os.close(fd)
      who = (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started "
             f"{holder.get('started', '?')}") if holder.get("pid") else "a process still starting up"
      return (f"--workdir={self.workdir!r} is in use by another trainer ({who}); wait for it to finish, stop it, "
              f"or choose another --workdir")
    self.fd = fd
    self.started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    return None

  def announce(self) -> None:
    """Writes this trainer's PID, host and start time into the lock file, for the message a
    second trainer gets. Called once the run is accepted (config and checkpoint checked), so a
    refused run leaves the file as it was."""
    if self.fd is None:
      return
    info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": self.started}).encode()
    try:  # the holder's name is a courtesy: a full disk must not stop the run
      os.ftruncate(self.fd, 0)
      os.pwrite(self.fd, info, 0)
      self.announced = True
    except OSError:
      pass

  def release(self) -> None:
    if self.fd is not None:
      with contextlib.suppress(OSError):
        if self.announced:  # no stale name for the next trainer's start-up window
          os.ftruncate(self.fd, 0)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
      os.close(self.fd)
      self.fd = None

  def __del__(self):  # an Experiment dropped without close(): the lock goes with it
    with contextlib.suppress(Exception):
      self.release()


def _read_holder(fd: int) -> dict:
  try:
    return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
  except (OSError, ValueError):
    return {}


def acquire(workdir: str) -> WorkdirLock | None:
  """Process 0 takes the workdir's lock; every process raises the same UserError if it is held.

  Returns the lock on process 0 (release it when the run ends), None elsewhere.
  """
  import jax  # noqa: PLC0415

  lock, refusal = None, None
  if jax.process_index() == 0:
    lock = WorkdirLock(workdir)
    try:
      refusal = lock.try_acquire()
    except Exception as e:  # noqa: BLE001 - never leave the other processes waiting in the broadcast
      refusal = f"--workdir={workdir!r}: cannot take its lock ({type(e).__name__}: {e})"
  if jax.process_count() > 1:  # every process must leave if process 0 was refused
    import numpy as np  # noqa: PLC0415
    from jax.experimental import multihost_utils  # noqa: PLC0415
    buf = np.zeros(1024, np.uint8)
    if refusal:
      raw = refusal.encode()[:1024]
      buf[:len(raw)] = np.frombuffer(raw, np.uint8)
    buf = np.asarray(multihost_utils.broadcast_one_to_all(buf))
    refusal = bytes(buf[buf != 0]).decode(errors="replace") or None
  if refusal:
    raise UserError(refusal)
  if lock is not None:
    remove_stale_temporaries(workdir)
  return lock


def remove_unfinished_checkpoints(workdir: str) -> list[str]:
  """Removes the temporary directories (`*.orbax-checkpoint-tmp*`) of saves that never finished,
  in checkpoints/ and best_checkpoint/; returns their paths. Only safe with no save under way."""
  removed = []
  for sub in ("checkpoints", "best_checkpoint"):
    root = os.path.join(workdir, sub)
    if not os.path.isdir(root):
      continue
    for name in sorted(os.listdir(root)):
      if ".orbax-checkpoint-tmp" in name:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        removed.append(os.path.join(root, name))
  return removed


def remove_stale_temporaries(workdir: str) -> list[str]:
  """Removes unfinished checkpoints and the trainer's own temporary files left by a dead
  writer. Only safe while holding the workdir's lock."""
  removed = remove_unfinished_checkpoints(workdir)
  for path in removed:
    log.warning("removed %s, an unfinished checkpoint a stopped run left behind", path)
  for name in os.listdir(workdir):  # the trainer's own temporaries (not evaluate's, which may run beside it)
    if name in ("config.json.tmp", "metrics.jsonl.tmp") or (name.startswith("config_resumed_at_")
                                                           and name.endswith(".tmp")):
      with contextlib.suppress(OSError):
        os.remove(os.path.join(workdir, name))
  return removed


# -- I/O faults --------------------------------------------------------------------------


def _chain(exc: BaseException):
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    yield exc
    exc = exc.__cause__ or exc.__context__


def disk_full(exc: BaseException) -> bool:
  """True when `exc` (or what caused it) is the disk refusing a write."""
  for e in _chain(exc):
    if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
      return True
    if any(m in str(e) for m in _FULL_MARKERS):
      return True
  return False


def _failed_path(exc: BaseException, default: str) -> str:
  for e in _chain(exc):
    if isinstance(e, OSError) and e.filename:
      return str(e.filename)
    paths = re.findall(r'"(/[^"]+)"', str(e))
    if paths:
      return paths[-1]
  return default


def _reason(exc: BaseException) -> str:
  text = " ".join(str(e) for e in _chain(exc))
  for e in _chain(exc):
    if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
      return os.strerror(e.errno).lower()
  if "quota" in text.lower() or "os_error_code='122'" in text:
    return "disk quota exceeded"
  if "Read-only" in text or "os_error_code='30'" in text:
    return "read-only file system"
  return "no space left on device"


def io_fault(exc: BaseException, workdir: str, last_good: str) -> IOFault:
  """The one sentence for a disk that refused a write during a run."""
  path = _failed_path(exc, workdir)
  try:
    device = _mount_point(path)
  except OSError:
    device = "?"
  return IOFault(f"{_reason(exc)} on {device} writing {path}; {last_good}; free space (or choose another "
                 f"--workdir) and run the same command again to resume")


def _mount_point(path: str) -> str:
  path = os.path.abspath(path)
  while not os.path.exists(path):
    path = os.path.dirname(path)
  while not os.path.ismount(path):
    path = os.path.dirname(path)
  return path


class _QuietDiskFull(logging.Filter):
  """Drops log records about a full disk, and the asyncio/event-loop noise that follows it in
  the checkpoint library's threads: the run reports that fault once, itself."""

  def __init__(self):
    super().__init__()
    self.full = False

  def noise(self, exc: BaseException | None, text: str = "") -> bool:
    if exc is not None and disk_full(exc):
      self.full = True
      return True
    if any(m in text for m in _FULL_MARKERS):
      self.full = True
      return True
    after = ("loop is closed", "exception was never retrieved", "cannot schedule new futures")
    return self.full and any(m in text or (exc is not None and m in str(exc)) for m in after)

  def filter(self, record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    return not self.noise(exc, record.getMessage())


@contextlib.contextmanager
def quiet_disk_full_noise():
  """While active, log records and background-thread (or callback) tracebacks about a full disk
  are dropped, as are the errors of the library's event loops shutting down after it. After a
  disk-full failure the quieting stays in place: the process is about to exit, and the
  library's threads go on failing until it does."""
  filt = _QuietDiskFull()
  loggers = [logging.getLogger(), logging.getLogger("asyncio")]
  handlers = list(logging.getLogger().handlers)
  for h in handlers:
    h.addFilter(filt)
  loggers[1].addFilter(filt)
  old_hook, old_unraisable = threading.excepthook, sys.unraisablehook

  def hook(args):
    if not filt.noise(args.exc_value, str(args.exc_value)):
      old_hook(args)

  def unraisable(args):
    if not filt.noise(args.exc_value, str(args.exc_value)):
      old_unraisable(args)

  threading.excepthook, sys.unraisablehook = hook, unraisable
  try:
    yield
  except BaseException as e:
    if disk_full(e):
      filt.full = True
    raise
  finally:
    if not filt.full:
      threading.excepthook, sys.unraisablehook = old_hook, old_unraisable
      for h in handlers:
        h.removeFilter(filt)
      loggers[1].removeFilter(filt)
