"""Who owns a run's output_dir, and what may happen to an earlier run found in it.

`claim(out_dir, fresh=..., overwrite=...)` is held for a jlora-train run's lifetime. It checks that
output_dir is (or can become) a directory we can write to. It takes an exclusive fcntl lock on
`output_dir/.lock` and writes our pid there, so a second run on the same dir stops at once and names
the holder; the file is removed when the run ends, however it ends (but by SIGKILL). And it decides what
happens when a run starts over (`fresh`) where an earlier run left checkpoints. By default that is refused,
so a later `--resume` cannot continue the wrong run. With `overwrite`, the earlier run is moved aside whole,
in one rename, to `<dir>.old-<timestamp>`. Nothing is deleted, and the dir then holds only the run started
last. A disk that fills up mid-run is reported here too: `ensure_free_space` refuses a write that cannot
fit before it starts, `disk_errors` turns orbax's and tensorstore's many forms of ENOSPC into one OSError,
and `os_error_line` makes that one line. Checkpoint contents are jlora.checkpoint.train_state's and
.adapter's business.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import pathlib
import shutil
import time
from collections.abc import Callable, Iterator, Sequence

from jlora.errors import JloraError

LOCK_FILE = ".lock"
# What a jlora-train run leaves in its output_dir besides checkpoints: a finished adapter, its metrics log.
RUN_OUTPUTS = ("adapter", "metrics.jsonl")
# Every name a jlora-train or jlora-demo run writes at the top of its output_dir: a directory holding
# anything else is not (only) a jlora run, and --overwrite will not move it aside.
RUN_ENTRIES = frozenset(
    (LOCK_FILE, "checkpoints", *RUN_OUTPUTS, "tensorboard", "data", "peft", "loss.png")
    + ("demo_results.json", "eval_generations.jsonl")
)


class RunDirError(JloraError, ValueError):
    """An output_dir that cannot be used for this run; one-line message naming it and the fix."""


def checkpoint_steps(out_dir: str | pathlib.Path) -> list[int]:
    """The complete checkpoint steps in `out_dir/checkpoints` (orbax step dirs; its tmp dirs are not steps)."""
    ckpts = pathlib.Path(out_dir) / "checkpoints"
    if not ckpts.is_dir():
        return []
    return sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit() and p.is_dir())


def os_error_line(e: OSError) -> str:
    """One line for a failed file operation: the path, the cause, and for a full disk what to do next."""
    where = f"{e.filename}: " if e.filename else ""
    line = f"{where}{e.strerror or e}"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        line += "; the last complete checkpoint is kept: free some space, then rerun with --resume"
    return line


# How a full disk reads once orbax or tensorstore has wrapped it in another exception type.
_NO_SPACE = ("No space left on device", "os_error_code='28'", "Disk quota exceeded")


def out_of_space(e: BaseException | None) -> bool:
    """Whether `e`, or an error it was raised from, is a full disk."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(s in str(e) for s in _NO_SPACE):
            return True
        e = e.__cause__ or e.__context__
    return False


class _DropOutOfSpace(logging.Filter):
    """Drops the full-disk tracebacks that orbax's worker threads (absl) and asyncio log on their own."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and out_of_space(record.exc_info[1]):
            return False
        return not any(s in record.getMessage() for s in _NO_SPACE)


def allocated_bytes(path: str | pathlib.Path) -> int:
    """Disk space a directory tree takes (allocated blocks, which is what fills a disk)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


def ensure_free_space(directory: str | pathlib.Path, need: int, where: str | pathlib.Path) -> None:
    """OSError(ENOSPC) naming `where` unless `directory`'s file system has `need` bytes free.

    Checked before a checkpoint is written: a write that fails half-way inside orbax's threads logs
    tracebacks from several of them, which a check beforehand avoids. Not a local path: no check."""
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return
    if free < need:
        raise OSError(
            errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (about {need:,} bytes needed, {free:,} free)", str(where)
        )


@contextlib.contextmanager
def disk_errors(where: str | pathlib.Path) -> Iterator[None]:
    """Raise a full disk met in the block, whatever type it came as, as OSError(ENOSPC) naming `where`.

    The error reaches the caller, which reports it in one line, so the copies that library threads
    log (with tracebacks) are dropped."""
    for name in ("absl", "asyncio"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropOutOfSpace) for f in logger.filters):
            logger.addFilter(_DropOutOfSpace())
    try:
        yield
    except Exception as e:
        if out_of_space(e):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(where)) from None
        raise


def _usable_dir(out: pathlib.Path) -> None:
    if out.exists() and not out.is_dir():
        raise RunDirError(f"output_dir {out}: exists and is a file, not a directory; set output_dir to a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(
            f"output_dir {out}: cannot create it ({e.strerror}); set output_dir to a writable directory"
        ) from None


def _lock(out: pathlib.Path) -> int:
    """An fd holding the exclusive lock on out/.lock, with our pid written in it."""
    path = out / LOCK_FILE
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunDirError(
                f"output_dir {out}: not writable ({e.strerror}); set output_dir to a writable directory"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirError(
                f"output_dir {out}: in use by another jlora-train run (pid {holder}); wait for it to "
                f"end, or choose another output_dir"
            ) from None
        if _is_file_of(fd, path):
            break
        os.close(fd)  # a run that just ended removed the file we opened: lock the one at the path now
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError as e:
        os.close(fd)
        raise RunDirError(
            f"output_dir {out}: cannot write {LOCK_FILE} ({e.strerror}); free space or choose another output_dir"
        ) from None
    return fd


def _is_file_of(fd: int, path: pathlib.Path) -> bool:
    """Whether `fd` is the file at `path` (not one unlinked since it was opened)."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _unlock(fd: int, path: pathlib.Path) -> None:
    """Remove the lock file we hold, then release it: a finished run leaves no .lock behind. Removed first,
    while still held, so a run that opened it meanwhile sees it is gone (`_lock`) and locks a fresh one."""
    with contextlib.suppress(OSError):
        if _is_file_of(fd, path):
            os.unlink(path)
    os.close(fd)


def _aside_path(out: pathlib.Path) -> pathlib.Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside, n = out.with_name(f"{out.name}.old-{stamp}"), 1
    while os.path.lexists(aside):
        aside, n = out.with_name(f"{out.name}.old-{stamp}-{n}"), n + 1
    return aside


def _check_movable(out: pathlib.Path, reads: Sequence[str | pathlib.Path]) -> None:
    """RunDirError unless `out` holds only what a jlora run writes, and nothing this run reads."""
    foreign = sorted(p.name for p in out.iterdir() if p.name not in RUN_ENTRIES)
    if foreign:
        shown = ", ".join(foreign[:4]) + (f" and {len(foreign) - 4} more" if len(foreign) > 4 else "")
        raise RunDirError(
            f"output_dir {out}: holds {shown}, which no jlora run writes; --overwrite moves aside only an "
            f"earlier jlora run: choose another output_dir"
        )
    for path in reads:
        where = pathlib.Path(path).absolute()
        if where == out or out in where.parents:
            raise RunDirError(
                f"output_dir {out}: holds {path}, which this run reads; --overwrite would move it aside with "
                f"the earlier run: choose another output_dir"
            )


def _move_aside(out: pathlib.Path, fd: int) -> tuple[pathlib.Path, int]:
    """Rename the whole earlier run (we hold its lock) to a sibling; lock a fresh `out`. -> (aside, new fd)."""
    aside = _aside_path(out)
    try:
        os.rename(out, aside)
    except OSError as e:
        raise RunDirError(
            f"output_dir {out}: cannot move the earlier run aside to {aside} ({e.strerror}); move or delete it yourself"
        ) from None
    _usable_dir(out)
    new_fd = _lock(out)
    _unlock(fd, aside / LOCK_FILE)  # the old lock went along with the old run: it is no run's now
    return aside, new_fd


@contextlib.contextmanager
def claim(
    out_dir: str | pathlib.Path,
    *,
    fresh: bool,
    overwrite: bool = False,
    primary: bool = True,
    sync: Callable[[str], None] = lambda _name: None,
    reads: Sequence[str | pathlib.Path] = (),
) -> Iterator[pathlib.Path | None]:
    """Hold `out_dir` for one run; yields where an earlier run was moved (with `overwrite`), else None.

    fresh: the run starts over rather than resuming. Then checkpoints already in `out_dir` are a
    RunDirError, unless `overwrite` moves the earlier run aside. An earlier run's adapter or metrics
    with no checkpoint to resume from (a finished run whose checkpoints were pruned) are refused the
    same way, resuming or not: a new run would replace them. `overwrite` moves only a recognisable
    jlora run: a dir holding anything a run does not write (a model, say), or any of the files in `reads`
    (the run's data, model, config), is refused instead. Only the `primary` process locks and moves;
    all of them check, and `sync` (a barrier taking a name) makes the others wait."""
    out = pathlib.Path(out_dir).absolute()
    fd, aside = None, None
    if primary:
        _usable_dir(out)
        fd = _lock(out)  # first: a dir in use says so, not that it holds checkpoints
    try:
        steps = checkpoint_steps(out)
        if fresh and steps and not overwrite:
            raise RunDirError(
                f"output_dir {out}: holds checkpoints of an earlier run (steps {steps[0]}.."
                f"{steps[-1]}); pass --resume to continue it, or --overwrite to move it aside and "
                f"start over"
            )
        outputs = [name for name in RUN_OUTPUTS if (out / name).exists()]
        if not steps and outputs and not overwrite:  # nothing to resume: the new run would replace them
            raise RunDirError(
                f"output_dir {out}: holds an earlier run's {' and '.join(outputs)} and no checkpoint to resume "
                f"from; pass --overwrite to move it aside and start over, or choose another output_dir"
            )
        if primary and fresh and overwrite and (steps or outputs):
            _check_movable(out, reads)
            aside, fd = _move_aside(out, fd)
        sync("jlora_run_dir_claimed")
        yield aside
    finally:  # on success, an error or a signal's Stopped alike; only SIGKILL leaves the file (unlocked)
        if fd is not None:
            _unlock(fd, out / LOCK_FILE)
