"""The eval text's token count, known before any stage: the preflight refuses a text shorter
than one window (eval.n_ctx) in seconds, where the evaluation would refuse it only after the
merge and the quantisation (17 s on the default model, about 10 minutes at 7B).

    from quantpipe.token_count import check_eval_text
    check_eval_text(cfg)     # ConfigError naming eval.text_file, its token count and eval.n_ctx

The count comes from the tokenizer the evaluation will use: the user's model folder's
(model.path; the merge keeps the base's tokenizer), or for the embedded default, the GGUF's own
vocabulary, which tokenises as the tokenizer the base stage saves from it, so it is known before
the base stage has run. Counts are cached under paths.artifacts/token-count/ by the text's
digest and the tokenizer's, so a run with a text already counted loads no tokenizer.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig

from quantpipe import artifacts as art
from quantpipe.errors import ConfigError

CACHE = "token-count"
# what a tokenizer is not made of: weights are left out of its fingerprint (a 14 GB shard is
# not read for it); config.json and the tokenizer files are in
WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def check_eval_text(cfg: DictConfig) -> int:
    """The eval text (eval.text_file, or the default split) holds at least one window of
    eval.n_ctx tokens; returns its token count."""
    from quantpipe.data import load_text
    text, source = load_text(cfg.eval.text_file, "eval", "eval.text_file")
    n = count_tokens(cfg, text)
    if n < cfg.eval.n_ctx:
        shown = (cfg.eval.text_file if cfg.eval.text_file is not None
                 else f"the default eval text ({source})")
        raise ConfigError("eval.text_file", f"{shown} has {n} tokens, fewer than one window "
                          f"(eval.n_ctx={cfg.eval.n_ctx})", "use a longer text or a smaller "
                          "eval.n_ctx")
    return n


def count_tokens(cfg: DictConfig, text: str) -> int:
    """Tokens of `text` for the run's model (no special tokens: the evaluation adds none),
    read from the cache or counted and cached."""
    tokenizer_fp, counter = tokenizer_of(cfg)
    from quantpipe.tracking import versions_of  # a new tokenizer library may split otherwise
    key = art.fingerprint(CACHE, hashlib.sha256(text.encode()).hexdigest(), tokenizer_fp,
                          versions_of(("tokenizers", "transformers", "llama_cpp_python")))
    # a cache entry like a stage's (artifacts/token-count/<key>/provenance.json): one process
    # counts, another starting with the same text waits for it and reads its count
    _, prov, _ = art.ensure_cached(Path(cfg.paths.artifacts), CACHE, key,
                                   lambda tmp: {"tokens": counter(text)})
    return int(prov["result"]["tokens"])


def tokenizer_of(cfg: DictConfig) -> tuple[str, Callable[[str], int]]:
    """(fingerprint, token counter) of the tokenizer the evaluation will use. Loading it the
    way the stages do would cost more than the rest of the preflight: transformers' import is
    3 s, and its GGUF tokenizer 18 s (it parses 49k token strings in Python). So the embedded
    GGUF is read by llama.cpp's own loader (vocab only, 0.5 s), which tokenises exactly as
    base.gguf_tokenizer does (17,185 tokens of the eval split, both), and a folder's
    tokenizer.json by the `tokenizers` library transformers wraps (0.2 s; the same ids as
    AutoTokenizer on the train, calibration and eval splits). A folder without tokenizer.json
    (a slow, sentencepiece-only tokenizer) goes through transformers."""
    from quantpipe import base
    if cfg.model.path is None:
        gguf = base.embedded_gguf(cfg.model.embedded)
        return (art.fingerprint(art.quick_file_fingerprint(gguf), base.RECIPE),
                lambda text: _gguf_count(gguf, text))
    path = base.validate_hf_folder(Path(cfg.model.path), "model.path", cfg.model.allow_pickle)
    small = sorted(p for p in path.iterdir() if p.is_file() and p.suffix not in WEIGHTS)
    fp = art.fingerprint([(p.name, art.quick_file_fingerprint(p)) for p in small])
    return fp, lambda text: _folder_count(path, text)


def _gguf_count(gguf: Path, text: str) -> int:
    import os

    import llama_cpp

    from quantpipe.console import output_to
    with output_to(Path(os.devnull)):  # llama.cpp's loader talks on stderr, verbose=False or not
        llm = llama_cpp.Llama(str(gguf), vocab_only=True, verbose=False)
    # as quantpipe.evaluate.llama_cpp_runtime.LlamaCppRuntime.tokenize
    return len(llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))


def _folder_count(path: Path, text: str) -> int:
    if (path / "tokenizer.json").is_file():
        from tokenizers import Tokenizer
        try:
            tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:  # the library's own error type for a file it cannot parse
            raise ConfigError("model.path", f"{path / 'tokenizer.json'} cannot be read ({e})",
                              "save the tokenizer again (tokenizer.save_pretrained(<model.path>))"
                              ) from e
        return len(tok.encode(text, add_special_tokens=False).ids)
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError("model.path", f"{path} has no tokenizer transformers can load "
                          f"({str(e).splitlines()[0] if str(e) else type(e).__name__})",
                          "save the tokenizer beside the model (tokenizer.save_pretrained"
                          "(<model.path>))") from e
    return len(tok(text, add_special_tokens=False)["input_ids"])
