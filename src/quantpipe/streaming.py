"""LoRA merge shard by shard, for bases too large to hold in RAM (a 7B FP16 model is 13.5 GB).

    merge_lora_streaming(Path("/models/base"), Path("/runs/lora"), Path("/tmp/merged"))

peft's `merge_and_unload` needs the whole model in float32 (4 bytes per weight: 27 GB for 7B).
Here each tensor of each safetensors shard is read, merged and written before the next is read:
for a targeted weight,
W' = fp16(float32(W) + scale * B @ A), the same arithmetic as peft's merge (so the two paths give
the same bits; tests/test_streaming.py checks it); other tensors are cast to FP16 and copied.
The output shard is written tensor by tensor after its header (the header only needs shapes),
so memory stays near one tensor (the largest: the 0.4 GB embedding of a 7B). Tensors are read
with plain reads, not safetensors' memory map: mapped pages count in the process's RSS until
the file is closed, which made the peak one whole shard (2.7 GB for a one-shard 1B). Index, config and
tokenizer files are copied; code files (*.py) never are. Used by quantpipe.merge above
merge.stream_above_gb.

scale = lora_alpha / r (lora_alpha / sqrt(r) with use_rslora), per module from rank_pattern /
alpha_pattern; fan_in_fan_out transposes the delta (GPT-2's Conv1D); embedding LoRA
(lora_embedding_A/B) is merged as peft does; other adapter tensors (modules_to_save, biases)
replace the base tensor of the same name. DoRA and LoRA biases are left to peft.
"""
from __future__ import annotations

import json
import logging
import math
import re
import shutil
from pathlib import Path

from tqdm import tqdm

from quantpipe.errors import ConfigError

log = logging.getLogger(__name__)
INDEX = "model.safetensors.index.json"
CODE_OR_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".py", ".pyc")
_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
           "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
           "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def shard_files(folder: Path) -> list[Path]:
    """The safetensors shards of a model folder, in index order."""
    folder = Path(folder)
    index = folder / INDEX
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    return sorted(folder.glob("*.safetensors"))


def read_header(path: Path) -> dict:
    """A safetensors header: {name: {dtype, shape, data_offsets}}, plus __metadata__."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n))


def read_tensor(f, info: dict):
    """One tensor of an open safetensors file, read into fresh memory (not mapped)."""
    import torch
    dtype = getattr(torch, _DTYPES[info["dtype"]])
    start, end = info["data_offsets"]
    if end == start:
        return torch.empty(info["shape"], dtype=dtype)
    f.seek(0)
    data = 8 + int.from_bytes(f.read(8), "little")  # tensor data follows the header
    f.seek(data + start)
    buf = bytearray(end - start)
    if f.readinto(buf) != len(buf):
        raise ValueError(f"{f.name} is truncated")
    return torch.frombuffer(buf, dtype=dtype).reshape(info["shape"])


def n_params(folder: Path) -> int:
    """Parameters in a safetensors model folder, from the headers alone."""
    return sum(math.prod(v["shape"]) for f in shard_files(folder)
               for k, v in read_header(f).items() if k != "__metadata__")


def write_safetensors(path: Path, specs: list[tuple[str, str, list[int]]], tensors,
                      metadata: dict[str, str] | None = None) -> int:
    """Write a safetensors file from `specs` (name, dtype code, shape) and an iterator yielding
    the tensors in the same order, one at a time (save_file would need them all in RAM, and
    serialises a second copy). Returns the bytes of tensor data written."""
    import torch
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    itemsize = {k: torch.empty(0, dtype=getattr(torch, v)).element_size() for k, v in _DTYPES.items()}
    for name, dtype, shape in specs:
        size = math.prod(shape) * itemsize[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the spec pads the header to a multiple of 8 bytes
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for (name, dtype, shape), t in zip(specs, tensors, strict=True):
            if str(t.dtype).removeprefix("torch.") != _DTYPES[dtype] or list(t.shape) != list(shape):
                raise ValueError(f"{name}: got {t.dtype} {list(t.shape)}, header says {dtype} {shape}")
            f.write(t.contiguous().view(-1).view(torch.uint8).numpy().data)
    return offset


def _pattern_value(patterns: dict, module: str, default):
    """peft's rank_pattern / alpha_pattern: the first key matching the module name's tail."""
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?({key})", module):
            return value
    return default


class LoraDeltas:
    """The adapter's tensors (small: a few hundred MB for a 7B rank-16 LoRA), keyed by the base
    tensor they change."""

    def __init__(self, adapter: Path, base_keys: set[str]):
        from safetensors.torch import load_file
        cfg = json.loads((adapter / "adapter_config.json").read_text())
        if cfg.get("peft_type", "LORA") != "LORA":
            raise ConfigError("adapter.path", f"{adapter} is a {cfg['peft_type']} adapter; the "
                              "streaming merge handles LoRA", "raise merge.stream_above_gb so "
                              "peft merges it in RAM")
        for flag in ("use_dora", "lora_bias", "layer_replication"):
            if cfg.get(flag):
                raise ConfigError("adapter.path", f"{adapter} uses {flag}, which the streaming "
                                  "merge does not implement", "raise merge.stream_above_gb so "
                                  "peft merges it in RAM")
        self.cfg, self.adapter = cfg, adapter
        tensors = load_file(adapter / "adapter_model.safetensors")
        self.pairs: dict[str, dict] = {}        # base key -> {"A", "B", "module", "embedding"}
        self.replace: dict[str, object] = {}    # base key -> tensor (modules_to_save, biases)
        unknown = []
        for key, t in tensors.items():
            name = key.removeprefix("base_model.model.")
            m = re.fullmatch(r"(?P<mod>.+)\.lora_(?P<emb>embedding_)?(?P<ab>[AB])(\.weight)?", name)
            if m:
                base_key = f"{m['mod']}.weight"
                entry = self.pairs.setdefault(base_key, {"module": m["mod"],
                                                         "embedding": bool(m["emb"])})
                entry[m["ab"]] = t
                if base_key not in base_keys:
                    unknown.append(base_key)
            elif name in base_keys:
                self.replace[name] = t
            else:
                unknown.append(name)
        if unknown:
            raise ConfigError("adapter.path", f"{adapter} changes tensors the base model lacks: "
                              f"{sorted(set(unknown))[:5]} ({len(set(unknown))} in all)",
                              "use an adapter trained on this base model (model.path)")

    def scale(self, module: str, r: int) -> float:
        alpha = _pattern_value(self.cfg.get("alpha_pattern"), module, self.cfg.get("lora_alpha", 8))
        return alpha / math.sqrt(r) if self.cfg.get("use_rslora") else alpha / r

    def apply(self, key: str, weight):
        """The merged FP16 tensor for base tensor `key` (float32 arithmetic, one rounding)."""
        import torch
        if key in self.replace:
            new = self.replace[key]
            if new.shape != weight.shape:
                raise ConfigError("adapter.path", f"{self.adapter}: {key} is {list(new.shape)} in "
                                  f"the adapter but {list(weight.shape)} in the base",
                                  "use an adapter trained on this base model")
            return new.to(torch.float16)
        pair = self.pairs.get(key)
        if pair is None:
            return weight.to(torch.float16) if weight.is_floating_point() else weight
        a, b = pair["A"].float(), pair["B"].float()
        delta = b @ a
        if pair["embedding"] or self.cfg.get("fan_in_fan_out"):
            delta = delta.T
        delta = delta * self.scale(pair["module"], a.shape[0])  # peft: transpose(B @ A) * scaling
        if delta.shape != weight.shape:
            raise ConfigError("adapter.path", f"{self.adapter} does not fit the base: {key} is "
                              f"{list(weight.shape)} but the LoRA update is {list(delta.shape)} "
                              "(another hidden size or architecture)",
                              "use an adapter trained on this base model (model.path)")
        return (weight.float() + delta).to(torch.float16)


def check_targets(adapter: Path, base_keys: set[str]) -> None:
    """Every module name the adapter config targets exists in the base."""
    targets = json.loads((adapter / "adapter_config.json").read_text()).get("target_modules") or []
    if isinstance(targets, str):  # a regex
        return
    names = {k.rsplit(".", 2)[-2] for k in base_keys if k.count(".") >= 1}
    missing = sorted(set(targets) - names)
    if missing:
        raise ConfigError("adapter.path", f"{adapter} targets modules the base model lacks: "
                          f"{missing}", "use an adapter trained on this base model (model.path)")


def merge_lora_streaming(base: Path, adapter: Path | None, out: Path) -> dict:
    """Merge `adapter` (None: just cast) into `base`, writing FP16 shards to `out`."""
    import torch
    base, out = Path(base), Path(out)
    shards = shard_files(base)
    if not shards:
        raise ConfigError("model.path", f"{base} has no *.safetensors to stream",
                          "convert the base to safetensors, or raise merge.stream_above_gb")
    headers = {s: read_header(s) for s in shards}
    base_keys = {k for h in headers.values() for k in h if k != "__metadata__"}
    deltas = None
    if adapter is not None:
        check_targets(adapter, base_keys)
        deltas = LoraDeltas(adapter, base_keys)
    out.mkdir(parents=True, exist_ok=True)
    total = n_merged = 0
    # a 7B streams for ~85 s on 2 cores: one bar over every tensor of every shard
    bar = tqdm(total=len(base_keys), desc="merge (streamed)", unit="tensor")
    for shard in shards:
        header = headers[shard]
        names = sorted((k for k in header if k != "__metadata__"),
                       key=lambda k: header[k]["data_offsets"][0])
        specs = [(k, "F16" if header[k]["dtype"].startswith(("F", "BF")) else header[k]["dtype"],
                  header[k]["shape"]) for k in names]
        with open(shard, "rb") as f:
            # one at a time: read, merge, write, forget (consumed before the loop moves on)
            def tensors(f=f, header=header, names=names):
                for k in names:
                    t = read_tensor(f, header[k])
                    bar.update()
                    if deltas is not None:
                        yield deltas.apply(k, t)
                    else:
                        yield t.to(torch.float16) if t.is_floating_point() else t
            total += write_safetensors(out / shard.name, specs, tensors())
        if deltas:
            n_merged += sum(k in deltas.pairs or k in deltas.replace for k in names)
        log.debug("streamed %s (%d tensors)", shard.name, len(names))
    bar.close()
    _copy_side_files(base, out, total)
    return {"metrics": {"n_params": float(sum(math.prod(h[k]["shape"]) for h in headers.values()
                                              for k in h if k != "__metadata__")),
                        "merge_streamed": 1.0, "merge_tensors_changed": float(n_merged)}}


def _copy_side_files(base: Path, out: Path, total_bytes: int) -> None:
    """config.json (dtype float16), the index (new total size), tokenizer and generation files;
    never code (*.py): a merged folder must not carry code a later trust_remote_code would run."""
    for f in base.iterdir():
        if not f.is_file() or f.suffix in CODE_OR_WEIGHTS or f.name in (INDEX, "provenance.json"):
            continue
        shutil.copy2(f, out / f.name)
    cfg = json.loads((base / "config.json").read_text())
    cfg["dtype"] = "float16"
    if "torch_dtype" in cfg:
        cfg["torch_dtype"] = "float16"
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if (base / INDEX).is_file():
        index = json.loads((base / INDEX).read_text())
        index.setdefault("metadata", {})["total_size"] = total_bytes
        (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
