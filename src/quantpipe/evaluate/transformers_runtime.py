"""transformers as an evaluation runtime: Hugging Face folders (fp16, bitsandbytes int8/int4,
compressed-tensors decompressed) in the dtype they are stored in, fed the evaluation's token ids.
Registered in quantpipe.evaluate.runtimes; the worker opens it by name:

    rt = open_runtime(folder, threads, n_ctx, runtime="transformers")
    rt.window_logits(window_ids, first=0) -> [n_ctx, vocab] float32 logits, one batched forward
    rt.prefill(ids) -> next token; rt.step(token) -> next token   (greedy, KV cache kept)
    rt.chat(prompt, max_new_tokens) -> (text, stopped_at_eos)
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np

from quantpipe import memory
from quantpipe.evaluate.runtimes import Runtime, Throughput, register

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # see quantize/bnb.py


@register
class HFRuntime(Runtime):
    name = "transformers"
    # bitsandbytes: the folders it loads are quantised with it (a new version recomputes them)
    libraries = ("transformers", "bitsandbytes", "torch")
    # benchmarks/cpu_throughput.py at 7B width (README "Evaluation at scale"): FP16 27.7
    # GFLOP/s prompt processing, 20.4 GB/s decoding
    throughput = Throughput("transformers", 27e9, 20e9, "fp16")
    artifact_kind = "folder"
    weight_suffixes = (".safetensors", ".bin")
    reference_settings = {"transformers": False, "transformers-float32": True}

    @classmethod
    def open(cls, path: Path, threads: int | None, n_ctx: int, float32: bool = False):
        return cls(path, threads, float32)

    @staticmethod
    def memory_for(weight_bytes: int, s: memory.Shape, n_ctx: int, float32: bool = False) -> int:
        """Peak RSS on CPU in the stored dtype (twice it in float32): the weights as stored
        (FP16, or the packed int8/int4 of a bitsandbytes folder, which keeps embeddings FP16),
        float32 logits of a window with their log-softmax copies, and attention scores."""
        logits = 4 * n_ctx * s.vocab * 4
        return (memory.PYTHON_TORCH + weight_bytes * (2 if float32 else 1) + logits
                + 2 * s.largest * 2)

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
