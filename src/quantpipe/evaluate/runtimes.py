"""Two runtimes behind one small interface, so every format is evaluated the same way:
transformers for Hugging Face folders (fp16, bitsandbytes int8/int4) and llama-cpp-python for
GGUF files. Both are fed the same token ids.

    rt = open_runtime(path, threads)
    rt.window_logits(window_ids, first=0) -> [n_ctx, vocab] float32 logits, one batched
                                   forward; rows before `first` may be left out (NaN)
    rt.prefill(ids) -> next token; rt.step(token) -> next token   (greedy, KV cache kept)
    rt.chat(prompt, max_new_tokens) -> (text, stopped_at_eos)
"""
from __future__ import annotations

import logging
import os
import warnings
import weakref
from pathlib import Path

import numpy as np

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # see quantize/bnb.py


def open_runtime(path: Path, threads: int | None, n_ctx: int, reference: bool = False,
                 runtime: str | None = None):
    """`runtime` as the backend's result names it ("llama.cpp" or "transformers"; None: a file
    runs on llama.cpp, a folder on transformers). `reference`: compute in float32
    (eval.reference_runtime=transformers-float32: 4 bytes a weight, small models only);
    otherwise in the dtype the model is stored in, as it would be deployed."""
    path = Path(path)
    if runtime == "llama.cpp" or (runtime is None and path.is_file()):
        return LlamaCppRuntime(path, threads, n_ctx)
    return HFRuntime(path, threads, reference)


class HFRuntime:
    name = "transformers"

    def __init__(self, path: Path, threads: int | None, reference: bool = False):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tok = AutoTokenizer.from_pretrained(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # deployed: FP16 tensors stay FP16 (bitsandbytes folders keep their non-quantised
            # tensors in it too); a float32 reference computes the same weights in float32
            dtype = torch.float32 if reference else torch.float16
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype,
                                                              device_map=self.device)
        self.model.eval()
        self.past = None

    def window_logits(self, window: np.ndarray, first: int = 0) -> np.ndarray:
        with self.torch.no_grad(), warnings.catch_warnings():  # every row (cheap to keep)
            warnings.simplefilter("ignore")
            ids = self.torch.tensor(window[None], device=self.device)
            return self.model(input_ids=ids).logits[0].float().cpu().numpy()

    def _next(self, ids) -> int:
        with self.torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = self.model(input_ids=ids, past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        return int(out.logits[0, -1].argmax())

    def prefill(self, ids: list[int]) -> int:
        self.past = None
        return self._next(self.torch.tensor([ids], device=self.device))

    def step(self, token: int) -> int:
        return self._next(self.torch.tensor([[token]], device=self.device))

    def sync(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def chat(self, prompt: str, max_new_tokens: int) -> tuple[str, bool]:
        ids = self.tok.apply_chat_template([{"role": "user", "content": prompt}],
                                           add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)["input_ids"].to(self.device)
        with self.torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = self.model.generate(input_ids=ids, max_new_tokens=max_new_tokens,
                                      do_sample=False)
        new = out[0, ids.shape[1]:].tolist()
        eos = self.tok.eos_token_id
        return self.tok.decode(new, skip_special_tokens=True), eos in new


class LlamaCppRuntime:
    name = "llama.cpp"

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

