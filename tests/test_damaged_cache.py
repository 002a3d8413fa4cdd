"""A cached artefact whose bytes no longer match what was recorded when it was built is never
reused or published: it is built again, with one warning line naming the file.

Fast: the cache entry on its own (edited, truncated, deleted, touched, its provenance.json
garbled or edited, from before manifests).
Pipeline: a damaged quantise artefact on the tiny model is rebuilt and the published GGUF equals
a clean build's; an unchanged second run finds nothing damaged (no stage writes into a cached
or hard-linked published file in place).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import pytest

from quantpipe import artifacts as art


def build_counter(calls: list):
    def build(tmp: Path) -> dict:
        calls.append(tmp)
        (tmp / "weights.bin").write_bytes(b"\x01" * 4096)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "config.json").write_text('{"a": 1}')
        return {"n": len(calls)}
    return build


def cached(root: Path, calls: list) -> tuple[Path, dict, bool]:
    return art.ensure_cached(root, "stage", "fp", build_counter(calls))


def test_the_manifest_records_every_file_and_an_intact_entry_is_reused(tmp_path):
    calls: list = []
    folder, prov, reused = cached(tmp_path, calls)
    assert not reused and sorted(prov[art.FILES]) == ["sub/config.json", "weights.bin"]
    size, _, digest = prov[art.FILES]["weights.bin"]
    assert size == 4096 and digest == hashlib.sha256(b"\x01" * 4096).hexdigest()
    assert cached(tmp_path, calls)[2] and len(calls) == 1


@pytest.mark.parametrize("fault, said", [
    ("edit", "weights.bin changed since it was built"),
    ("truncate", "weights.bin is 100 bytes, 4096 when it was built"),
    ("delete", "sub/config.json is missing"),
    ("garble record", "provenance.json is unreadable"),  # a byte flipped: no longer UTF-8
    ("edit record", "provenance.json changed since it was built"),  # still JSON, other numbers
])
def test_a_damaged_entry_is_built_again_with_one_line(tmp_path, caplog, fault, said):
    calls: list = []
    folder, _, _ = cached(tmp_path, calls)
    weights = folder / "weights.bin"
    if fault == "edit":  # same size, other bytes, a later mtime
        with open(weights, "r+b") as f:
            f.seek(2048)
            f.write(b"\x02")
    elif fault == "truncate":
        os.truncate(weights, 100)
    elif fault == "garble record":
        record = (folder / art.PROVENANCE).read_bytes()
        (folder / art.PROVENANCE).write_bytes(record[:40] + bytes([record[40] ^ 0xFF])
                                               + record[41:])
    elif fault == "edit record":
        text = (folder / art.PROVENANCE).read_text()
        (folder / art.PROVENANCE).write_text(text.replace('"n": 1', '"n": 7'))
    else:
        (folder / "sub" / "config.json").unlink()
    with caplog.at_level(logging.WARNING, logger="quantpipe.artifacts"):
        folder2, prov, reused = cached(tmp_path, calls)
    assert not reused and len(calls) == 2 and prov["result"] == {"n": 2}
    assert (folder2 / "weights.bin").read_bytes() == b"\x01" * 4096
    (line,) = [r.getMessage() for r in caplog.records]
    assert "damaged" in line and said in line and "building it again" in line


def test_a_touched_file_with_the_same_bytes_is_reused_after_a_hash(tmp_path, caplog):
    calls: list = []
    folder, prov, _ = cached(tmp_path, calls)
    st = (folder / "weights.bin").stat()
    os.utime(folder / "weights.bin", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with caplog.at_level(logging.WARNING):
        assert cached(tmp_path, calls)[2]
    assert len(calls) == 1 and not caplog.records


def test_an_entry_from_before_manifests_is_trusted(tmp_path):
    calls: list = []
    folder, _, _ = cached(tmp_path, calls)
    prov = art.read_provenance(folder)
    del prov[art.FILES], prov[art.RECORD]
    (folder / art.PROVENANCE).write_text(json.dumps(prov))
    with open(folder / "weights.bin", "r+b") as f:  # nothing recorded to compare against
        f.write(b"\x03")
    assert cached(tmp_path, calls)[2] and len(calls) == 1


@pytest.mark.slow  # two pipeline runs and a rebuild on the tiny model: make test-slow
def test_a_damaged_quantised_gguf_is_rebuilt_and_never_published(cfg_factory, caplog):
    from quantpipe.pipeline import run
    cfg = cfg_factory("+quant=gguf_q8_0", "adapter=none")
    run(cfg)
    published = Path(cfg.paths.quantized) / "model-q8_0.gguf"
    clean = hashlib.sha256(published.read_bytes()).hexdigest()
    with caplog.at_level(logging.WARNING, logger="quantpipe.artifacts"):
        run(cfg)  # unchanged: every stage reused, nothing damaged
    assert not [r for r in caplog.records if "damaged" in r.getMessage()]
    (entry,) = [p for p in (Path(cfg.paths.artifacts) / "quantise").iterdir()
                if p.is_dir() and not p.name.startswith(".")]
    gguf = next(entry.rglob("*.gguf"))
    with open(gguf, "r+b") as f:  # one byte flipped in the middle of the tensor data
        f.seek(gguf.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="quantpipe.artifacts"):
        run(cfg)
    assert any("damaged" in r.getMessage() and gguf.name in r.getMessage()
               for r in caplog.records)
    assert hashlib.sha256(published.read_bytes()).hexdigest() == clean
