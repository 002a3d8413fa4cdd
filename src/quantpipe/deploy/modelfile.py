"""Ollama export: a Modelfile beside a GGUF, its TEMPLATE converted from the model's own chat
template (the GGUF's `tokenizer.chat_template`), its stop parameters from the GGUF's EOS and
end-of-turn tokens.

    python -m pipelines.deploy modelfile            # writes quantized/Modelfile
    ollama create mymodel -f quantized/Modelfile && ollama run mymodel

Why: a fine-tuned GGUF served with the wrong template or without the end-of-turn stop answers in
gibberish or never stops. ChatML (`<|im_start|>role\\n...<|im_end|>`, SmolLM2, Qwen, ...) is
converted to Ollama's Go template; for another family the Modelfile carries no TEMPLATE and Ollama
falls back to its own detection from the same GGUF metadata (a message says so).
"""
from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from quantpipe import artifacts as art
from quantpipe.errors import ConfigError

log = logging.getLogger(__name__)

CHATML_START, CHATML_END = "<|im_start|>", "<|im_end|>"
# ChatML in Ollama's Go template language: system turns arrive as .System (Ollama collates every
# system message there, and inserts the Modelfile's SYSTEM when the request has none), user and
# assistant turns as .Messages. Renders the same text as the Jinja template with
# add_generation_prompt=True: "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n".
CHATML_OLLAMA = (
    '{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
    '{{ range .Messages }}{{ if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n'
    '<|im_start|>assistant\n{{ else if eq .Role "assistant" }}{{ .Content }}<|im_end|>\n'
    '{{ end }}{{ end }}')
# the default system prompt a ChatML template inserts when the chat has none (SmolLM2: "You are a
# helpful AI assistant named SmolLM, trained by Hugging Face")
# (the newline inside the Jinja string literal may be a real one or an escaped "\\n")
DEFAULT_SYSTEM = re.compile(re.escape(CHATML_START) + r"system(?:\n|\\n)([^{}']+?)"
                            + re.escape(CHATML_END))
# SmolLM2's model card suggests temperature 0.2, top_p 0.9 for its instruct models; small models
# drift into repetition or nonsense at Ollama's default 0.8
TEMPERATURE, TOP_P = 0.2, 0.9


@dataclass(frozen=True)
class ChatSpec:
    """What serving and export need to know about a GGUF's chat format."""
    template: str | None            # the Jinja chat template, verbatim
    family: str                     # "chatml" or "unknown"
    stops: tuple[str, ...] = ()     # EOS / end-of-turn texts, de-duplicated
    default_system: str | None = None
    context_length: int | None = None


def read_chat_spec(gguf_path: Path) -> ChatSpec:
    """Chat template, EOS/EOT token texts and training context length from a GGUF's metadata."""
    path = Path(gguf_path).resolve()
    try:
        st = path.stat()
    except OSError as e:
        raise ConfigError(str(path), f"cannot be read ({e})", "pass --model a .gguf file") from e
    return _read_chat_spec(path, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=8)
def _read_chat_spec(path: Path, mtime_ns: int, size: int) -> ChatSpec:
    # llama.cpp's own loader with vocab_only: ~0.3 s, where gguf.GGUFReader parses every one
    # of the 49k token strings in Python (4-5 s on SmolLM2; it made publishing a cached GGUF
    # variant the slowest step of an unchanged sweep)
    import llama_cpp
    try:
        llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    except (OSError, ValueError) as e:
        raise ConfigError(str(path), f"not a readable GGUF file ({e})",
                          "point --model at a .gguf file (make pipeline +quant=gguf_q4_k_m)") from e
    meta, vocab = llm.metadata, llm._model.vocab
    template = meta.get("tokenizer.chat_template")
    stops = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"):
        tid = meta.get(key)
        if tid is not None and 0 <= int(tid) < llama_cpp.llama_vocab_n_tokens(vocab):
            stops.append(llama_cpp.llama_vocab_get_text(vocab, int(tid)).decode("utf-8", "replace"))
    family = "chatml" if template and CHATML_START in template and CHATML_END in template \
        else "unknown"
    if family == "chatml":  # the end of a turn, and the start of a new one the model invents
        stops += [CHATML_END, CHATML_START]
    arch = meta.get("general.architecture")
    n_ctx = meta.get(f"{arch}.context_length") if arch else None
    default = DEFAULT_SYSTEM.search(template or "") if family == "chatml" else None
    return ChatSpec(template=template, family=family, stops=tuple(dict.fromkeys(stops)),
                    default_system=default.group(1) if default else None,
                    context_length=int(n_ctx) if n_ctx is not None else None)


def _quoted(text: str) -> str:
    if '"""' in text:
        raise ValueError(f"cannot quote {text!r} in a Modelfile")
    return f'"""{text}"""'


def render_modelfile(gguf_name: str, spec: ChatSpec, temperature: float = TEMPERATURE) -> str:
    """The Modelfile text for the GGUF `gguf_name` in the same folder."""
    lines = ["# Ollama Modelfile written by quantpipe (python -m pipelines.deploy modelfile).",
             "#   ollama create mymodel -f Modelfile && ollama run mymodel",
             f"FROM ./{gguf_name}"]
    if spec.family == "chatml":
        lines += ["# chat template: ChatML, converted from the GGUF's tokenizer.chat_template",
                  f"TEMPLATE {_quoted(CHATML_OLLAMA)}"]
        if spec.default_system:
            lines.append(f"SYSTEM {_quoted(spec.default_system)}")
    else:
        lines.append("# chat template: not ChatML; no TEMPLATE written, so Ollama uses its own "
                     "detection from the GGUF's tokenizer.chat_template. Check the result with "
                     "`ollama show --modelfile mymodel` and add a TEMPLATE if it is wrong.")
    lines += [f'PARAMETER stop "{s}"' for s in spec.stops if '"' not in s and "\n" not in s]
    lines += [f"PARAMETER temperature {temperature:g}", f"PARAMETER top_p {TOP_P:g}"]
    if spec.context_length:  # Ollama's default window (2048-4096) may be shorter than trained
        lines.append(f"PARAMETER num_ctx {min(spec.context_length, 4096)}")
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_path: Path, temperature: float = TEMPERATURE) -> Path:
    """Write `Modelfile` beside the GGUF (atomically) and return its path."""
    gguf_path = Path(gguf_path)
    spec = read_chat_spec(gguf_path)
    if spec.family != "chatml":
        log.warning("%s: chat template is %s; the Modelfile has no TEMPLATE and Ollama will detect "
                    "one from the GGUF metadata (supported conversion: ChatML)", gguf_path,
                    "missing" if spec.template is None else "not ChatML")
    if not spec.stops:
        log.warning("%s: no EOS/end-of-turn token in the GGUF metadata; no stop parameter written",
                    gguf_path)
    out = gguf_path.parent / "Modelfile"
    with art.atomic_path(out, is_dir=False) as tmp:
        tmp.write_text(render_modelfile(gguf_path.name, spec, temperature))
    log.info("wrote %s  (ollama create mymodel -f %s)", out, out)
    return out
