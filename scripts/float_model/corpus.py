"""Build the training corpus of the float subjects (`model=float`, `model=float_gemma`) from text
already on a Debian machine, so it can be rebuilt offline:

    python scripts/float_model/corpus.py OUT_DIR        (apt-get install dict-gcide dict-jargon
                                                          dict-foldoc fortunes first)

Sources (each a different register of English, plus code):
  - GCIDE, the Collaborative International Dictionary of English (dict-gcide): definitions and
    literary quotations, ~40 MB;
  - FOLDOC and the Jargon File (dict-foldoc, dict-jargon): computing prose, ~7 MB;
  - fortune cookies (fortunes), every file but `definitions` (it quotes Bierce), ~3 MB;
  - the Python standard library's own source (no tests, no site-packages), ~12 MB;
  - the *train* topics of `pydoc_data.topics` (the demo adapter's split), never its eval or
    calibration topics.
Held out on purpose: Ambrose Bierce's *The Devil's Dictionary* (dict-devil), the out-of-domain
evaluation text (src/quantpipe/texts/ood-devils-dictionary.txt), and the pydoc eval topics. The
calibration mix (src/quantpipe/texts/calib-*.txt) overlaps the training text, as a real model's
calibration set (C4, WikiText) overlaps its pre-training data.
Writes OUT_DIR/corpus.txt.xz and OUT_DIR/corpus.json (sources, characters, sha256).
"""
from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import sys
import sysconfig
from pathlib import Path

DICTS = ("gcide", "foldoc", "jargon")
FORTUNES = Path("/usr/share/games/fortunes")
HELD_OUT_FORTUNES = {"definitions"}


def dict_text(name: str) -> str:
    # dictd's .dz is gzip with random-access extras: gzip reads it whole
    text = gzip.open(f"/usr/share/dictd/{name}.dict.dz", "rt", encoding="utf-8",
                     errors="replace").read()
    # the database's own header entries (00-database-info, ...) are not prose
    return "\n".join(ln for ln in text.splitlines() if not ln.startswith("00-database"))


def fortunes_text() -> str:
    parts = []
    for f in sorted(FORTUNES.iterdir()):
        if f.suffix or f.is_symlink() or f.name in HELD_OUT_FORTUNES:
            continue
        parts.append(f.read_text(encoding="utf-8", errors="replace").replace("\n%\n", "\n\n"))
    return "\n\n".join(parts)


def stdlib_text() -> str:
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in lib.rglob("*.py")
                   if not {"test", "tests", "site-packages", "idle_test"} & set(p.parts)
                   and p.name != "topics.py")          # pydoc_data/topics.py: the eval text
    return "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files)


def pydoc_train_text() -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
    from quantpipe.data import topics_text
    return topics_text("train")


def main(out: str) -> None:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    sources = {**{f"dict-{d}": dict_text(d) for d in DICTS}, "fortunes": fortunes_text(),
               "python-stdlib": stdlib_text(), "pydoc-topics-train": pydoc_train_text()}
    text = "\n\n".join(sources.values())
    with lzma.open(out_dir / "corpus.txt.xz", "wt", encoding="utf-8", preset=6) as f:
        f.write(text)
    meta = {"sources": {k: {"chars": len(v)} for k, v in sources.items()},
            "chars": len(text), "sha256": hashlib.sha256(text.encode()).hexdigest(),
            "held_out": ["dict-devil (The Devil's Dictionary)", "fortunes/definitions",
                         "pydoc_data.topics eval and calib topics"]}
    (out_dir / "corpus.json").write_text(json.dumps(meta, indent=1))
    print(json.dumps(meta["sources"]), len(text), "chars")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".floatcarry")
