"""Replacing a whole directory at once: build the new one beside it, then swap it into place.

`replace_dir(target)` hands out a sibling path, `.NAME.partial`, to fill. When the block ends
without an error, that directory takes the target's place in one atomic step (Linux renameat2
with RENAME_EXCHANGE when the target exists), and only then is the old content deleted. A process
killed at any moment leaves at `target` either the old directory or the new one, never a
half-written one. The strays it may leave beside it (`.NAME.partial*`, `.NAME.old`) are removed by
the next replace of the same target. One writer per target at a time: jlora-train holds a lock on
its output_dir. This module does not know what goes in the directories (jlora.checkpoint.train_state,
jlora.checkpoint.adapter and jlora.cli.adapters fill them).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import pathlib
import shutil
from collections.abc import Callable, Iterator

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def partial_path(target: pathlib.Path) -> pathlib.Path:
    """Where the new content of `target` is built."""
    return target.with_name(f".{target.name}.partial")


def _old_path(target: pathlib.Path) -> pathlib.Path:
    return target.with_name(f".{target.name}.old")


def clean_strays(target: str | pathlib.Path) -> None:
    """Remove what an interrupted replace of `target` left beside it (orbax's own tmp dirs included).

    If a replace without RENAME_EXCHANGE was killed between its two renames, the target is missing
    and `.NAME.old` holds the last complete version: it is put back first."""
    target = pathlib.Path(target).absolute()
    old = _old_path(target)
    if old.is_dir() and not os.path.lexists(target):
        os.rename(old, target)
    _remove_partials(target)
    if old.is_dir():
        shutil.rmtree(old)


def _remove_partials(target: pathlib.Path) -> None:
    """`.NAME.partial` and whatever a library wrote beside it while filling it (orbax's tmp dirs)."""
    prefix = partial_path(target).name
    for stray in target.parent.iterdir() if target.parent.is_dir() else ():
        if stray.name.startswith(prefix):
            shutil.rmtree(stray) if stray.is_dir() and not stray.is_symlink() else stray.unlink()


def _exchange(a: pathlib.Path, b: pathlib.Path) -> bool:
    """Atomically swap two existing paths; False where the OS or filesystem cannot."""
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def swap_into_place(new: pathlib.Path, target: pathlib.Path) -> None:
    """Make the complete directory `new` appear at `target`, then delete what was there."""
    if not os.path.lexists(target):
        os.rename(new, target)
        return
    if _exchange(new, target):
        shutil.rmtree(new)  # `new` now holds the old content
        return
    # No RENAME_EXCHANGE (not Linux, or a filesystem without it): two renames, which clean_strays
    # undoes if a kill lands between them.
    old = _old_path(target)
    os.rename(target, old)
    os.rename(new, target)
    shutil.rmtree(old)


@contextlib.contextmanager
def replace_dir(
    target: str | pathlib.Path, *, primary: bool = True, sync: Callable[[str], None] = lambda _name: None
) -> Iterator[pathlib.Path]:
    """Yield the path (not yet created) to build `target`'s new content in; swap it in on success.

    On an error the partial directory is removed and the target is untouched. In a multi-process
    save every process writes into the same path; only `primary` cleans and swaps, and `sync`
    (a barrier taking a name) orders the two around the writes."""
    target = pathlib.Path(target).absolute()
    partial = partial_path(target)
    if primary:
        clean_strays(target)
        target.parent.mkdir(parents=True, exist_ok=True)
    sync("jlora_replace_dir_clean")
    try:
        yield partial
    except BaseException:
        if primary:
            with contextlib.suppress(OSError):  # the error being raised says more than a failed cleanup
                _remove_partials(target)
        raise
    sync("jlora_replace_dir_written")
    if primary:
        swap_into_place(partial, target)
    sync("jlora_replace_dir_swapped")
