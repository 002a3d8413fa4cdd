"""Train a float subject from scratch on a GPU: a small model whose weights were never quantised,
so format comparisons on it are not tilted toward any block grid. Two architectures, one recipe:
`--arch llama` is `model=float` (models/float-llama-19m), `--arch gemma3` is `model=float_gemma`
(models/float-gemma3-19m), which llama.cpp's converter and runtime take down another path
(Gemma3Model: norms stored as 1 + w, scaled embeddings, QK-norm, GELU, sliding-window layers).

    python scripts/float_model/train.py --corpus DIR --tokenizer DIR --out DIR [--arch gemma3]
                                        [--steps N] [--hidden 256 --layers 8 --intermediate 768
                                         --heads 4 --kv-heads 2]

DIR of --corpus holds corpus.txt.xz (scripts/float_model/corpus.py); --tokenizer a folder with
SmolLM2's tokenizer.json (the embedded default base's, so llama.cpp's converter knows it). The
shape is chosen for a 64 MiB limit on what comes back from the GPU machine and on what the
repository should carry: hidden 256 (a multiple of 256, so llama.cpp's K-quants apply to every
tensor, unlike SmolLM2's 576), 8 layers, GQA 4/2 heads of 64, MLP 768 (SwiGLU for Llama, GELU-tanh
gated for Gemma3), tied embeddings; 19 M parameters, 38 MB in FP16 (one safetensors file).
Gemma3's sliding layers (5 of each 6, its default pattern) see 256 tokens: half the 512 of a
training sequence and of eval.n_ctx, so the window really slides in training and in scoring.
bf16 autocast with float32 master weights, AdamW, cosine schedule; 1 % of the corpus is held out
for the validation loss. Saves FP16 safetensors, the tokenizer, and train_log.json (losses,
tokens, time). --hidden, --layers, --intermediate, --heads, --kv-heads override the shape.
"""
from __future__ import annotations

import argparse
import json
import lzma
import math
import shutil
import time
from pathlib import Path


def tokenise(corpus: Path, tok_dir: Path, max_chars: int | None = None):
    import numpy as np
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    text = lzma.open(corpus / "corpus.txt.xz", "rt", encoding="utf-8").read(max_chars or -1)
    # documents of ~64 kB, tokenised in parallel batches (the tokenizers library's own threads)
    chunks = [text[i:i + 65536] for i in range(0, len(text), 65536)]
    ids = [np.asarray(e.ids, dtype=np.uint16) for e in tok.encode_batch(chunks)]
    return np.concatenate(ids), tok.token_to_id("<|endoftext|>")


def build_model(arch: str, eos: int, hidden: int = 256, layers: int = 8, intermediate: int = 768,
                heads: int = 4, kv_heads: int = 2):
    """The untrained model: the shape of the module docstring (the defaults) in either
    architecture."""
    shape = dict(vocab_size=49152, hidden_size=hidden, intermediate_size=intermediate,
                 num_hidden_layers=layers, num_attention_heads=heads,
                 num_key_value_heads=kv_heads, head_dim=64,
                 max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=1,
                 eos_token_id=eos, pad_token_id=None, dtype="float16")
    if arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM
        return LlamaForCausalLM(LlamaConfig(**shape, rope_theta=10000.0, rms_norm_eps=1e-5))
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    # query_pre_attn_scalar = head_dim: llama.cpp scales scores by 1/sqrt(head_dim) for every
    # Gemma3 but the 27B, whatever the config says; pad_token_id None keeps <|endoftext|> (id 0,
    # Gemma's pad id) trainable instead of an embedding's padding_idx
    return Gemma3ForCausalLM(Gemma3TextConfig(**shape, query_pre_attn_scalar=64,
                                              sliding_window=256, rms_norm_eps=1e-6))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=Path, required=True)
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--arch", choices=("llama", "gemma3"), default="llama")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of this script only")
    ap.add_argument("--max-minutes", type=float, default=7.0,
                    help="stop training early (and say so in train_log.json) after this long")
    ap.add_argument("--max-chars", type=int, default=None, help="use the corpus's first N chars")
    ap.add_argument("--hidden", type=int, default=256, help="hidden size")
    ap.add_argument("--layers", type=int, default=8, help="decoder layers")
    ap.add_argument("--intermediate", type=int, default=768, help="MLP size")
    ap.add_argument("--heads", type=int, default=4, help="attention heads (of 64)")
    ap.add_argument("--kv-heads", type=int, default=2, help="key/value heads (GQA)")
    args = ap.parse_args()

    import numpy as np
    import torch

    torch.manual_seed(args.seed)
    t0 = time.time()
    ids, eos = tokenise(args.corpus, args.tokenizer, args.max_chars)
    n_val = len(ids) // 100
    train, val = torch.from_numpy(ids[:-n_val].astype(np.int64)), \
        torch.from_numpy(ids[-n_val:].astype(np.int64))
    print(f"tokens: {len(ids):,} (val {n_val:,}), tokenised in {time.time() - t0:.0f} s", flush=True)

    dev = torch.device(args.device)
    model = build_model(args.arch, eos, args.hidden, args.layers, args.intermediate, args.heads,
                        args.kv_heads).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": other, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), fused=dev.type == "cuda")
    warm = max(1, args.steps // 20)

    def lr_at(step: int) -> float:
        if step < warm:
            return args.lr * (step + 1) / warm
        p = (step - warm) / max(1, args.steps - warm)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))

    g = torch.Generator().manual_seed(args.seed)

    def batch(data):
        starts = torch.randint(0, len(data) - args.seq - 1, (args.batch,), generator=g)
        x = torch.stack([data[s:s + args.seq] for s in starts.tolist()])
        return x.to(dev, non_blocking=True)

    @torch.no_grad()
    def val_loss(n=16) -> float:
        model.eval()
        losses = []
        for i in range(n):
            s = i * (len(val) - args.seq - 1) // n
            x = torch.stack([val[s + j * 8:s + j * 8 + args.seq] for j in range(8)]).to(dev)
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                losses.append(model(input_ids=x, labels=x).loss.item())
        model.train()
        return float(np.mean(losses))

    log = []
    t1 = time.time()
    done = args.steps
    for step in range(args.steps):
        if time.time() - t1 > 60 * args.max_minutes:
            done = step
            print(f"stopped at step {step}: --max-minutes {args.max_minutes}", flush=True)
            break
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step)
        x = batch(train)
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 250 == 0 or step == args.steps - 1:
            row = {"step": step, "loss": round(loss.item(), 4), "lr": lr_at(step),
                   "s": round(time.time() - t1, 1)}
            if step % 1000 == 0 or step == args.steps - 1:
                row["val_loss"] = round(val_loss(), 4)
            log.append(row)
            print(row, flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    log.append({"step": done, "val_loss": round(val_loss(), 4)})
    model.to(torch.float16).save_pretrained(args.out, max_shard_size="100MB")  # 1 file by default
    for f in args.tokenizer.iterdir():
        shutil.copy(f, args.out / f.name)
    (args.out / "train_log.json").write_text(json.dumps({
        "arch": args.arch, "params": n_params,
        "shape": {k: getattr(args, k) for k in ("hidden", "layers", "intermediate", "heads",
                                                "kv_heads")},
        "steps": done, "steps_planned": args.steps,
        "batch": args.batch, "seq": args.seq, "lr": args.lr,
        "tokens_seen": done * args.batch * args.seq,
        "corpus_tokens": int(len(ids)), "val_tokens": int(n_val),
        "train_s": round(time.time() - t1, 1),
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
        "torch": torch.__version__, "log": log}, indent=1))
    print("saved", sorted(p.name for p in args.out.iterdir()), flush=True)


if __name__ == "__main__":
    main()
