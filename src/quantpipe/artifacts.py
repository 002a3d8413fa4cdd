"""Artefacts on disk: fingerprints, atomic writes, the stage cache and the quantized/ layout.

Every stage output lives in `artifacts/<stage>/<fingerprint>/`, written to a temporary sibling
and renamed into place only once complete; `provenance.json` inside it is written last and marks
it finished. A stage whose fingerprint (its inputs' fingerprints + its config) matches a finished
folder reuses it. Published models (`quantized/model-int4`, `quantized/model.gguf`, ...) are
hard links to (or copies of) cached files, swapped in atomically, so a failed run never leaves a
half-written file under a final name.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

PROVENANCE = "provenance.json"
_EDGE = 4 << 20  # bytes hashed at each end of a large input file


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


def size_bytes(path: Path, suffixes: tuple[str, ...] | None = None) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*")
               if p.is_file() and (suffixes is None or p.suffix in suffixes))


def _tmp_sibling(final: Path, tag: str) -> Path:
    return final.with_name(f".{final.name}.{tag}-{os.getpid()}-{time.monotonic_ns()}")


def replace_path(src: Path, final: Path) -> None:
    """Move `src` to `final`, replacing what is there. A file is replaced atomically
    (os.replace); a folder is swapped with two renames, the old one deleted only afterwards."""
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

    with atomic_path(final, is_dir=src.is_dir()) as tmp:
        if src.is_dir():
            shutil.copytree(src, tmp, dirs_exist_ok=True, copy_function=link_or_copy)
        else:
            link_or_copy(str(src), str(tmp))
    return final


def ensure_cached(artifacts_root: Path, stage: str, fp: str, build, provenance: dict | None = None
                  ) -> tuple[Path, dict, bool]:
    """Return (folder, provenance, reused) for `artifacts/<stage>/<fp>`, building it with
    `build(tmp_folder) -> dict` when no finished folder exists. The dict `build` returns is
    stored in provenance.json under "result"."""
    folder = cache_dir(artifacts_root, stage, fp)
    prov = read_provenance(folder)
    if prov is not None:
        return folder, prov, True
    with atomic_path(folder) as tmp:
        result = build(tmp) or {}
        prov = {"stage": stage, "fingerprint": fp, "result": result, **(provenance or {})}
        (tmp / PROVENANCE).write_text(json.dumps(prov, indent=2, sort_keys=True, default=str))
    return folder, prov, False
