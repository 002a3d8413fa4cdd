"""Advisory file locks (fcntl.flock) that let two pipelines share one artifacts/ and quantized/.

    with file_lock(artifacts / "merge" / ".3f9c.lock", "merge 3f9c"):
        ...build the merge once; a second pipeline waits here, then finds it finished

The lock belongs to an open file description, so the kernel drops it when the holder exits,
kill -9 included: a crashed pipeline never leaves a lock behind that blocks the next one. The
lock files themselves stay (deleting a lock file another process is waiting on would let a third
process lock a different inode); they are empty and dot-prefixed. flock works between processes
of one host, and on NFS v4 / Lustre mounts that map it to byte-range locks.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)


def lock_path(final: Path) -> Path:
    """The lock file that guards `final`: a dot-prefixed sibling, `.name.lock`."""
    final = Path(final)
    return final.with_name(f".{final.name}.lock")


@contextlib.contextmanager
def file_lock(path: Path, what: str = "", shared: bool = False) -> Iterator[None]:
    """Hold an exclusive (or shared) flock on `path` for the block, waiting as long as needed.
    Logs once when it has to wait, naming `what`, so a second pipeline says why it is idle."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    try:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            t0 = time.perf_counter()
            log.info("waiting for another process that holds %s (%s)", what or path.name, path)
            fcntl.flock(fd, mode)
            log.info("got %s after %.1f s", what or path.name, time.perf_counter() - t0)
        yield
    finally:
        os.close(fd)  # closing the last descriptor releases the lock
