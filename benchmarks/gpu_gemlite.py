"""W4A16 and W8A8-dynamic on a GPU kernel library that travels as a wheel: gemlite (Triton
kernels, pure Python: github.com/mobiusml/gemlite), used by benchmarks/gpu_bench.py for the
weight formats of the compressed-tensors variants, which the lent GPU has no vLLM to run.

    PYTHONPATH=src:/tmp/site python3 benchmarks/gpu_bench.py --out gpu.json \
        --variants fp16,w4a16_gemlite,w8a8_dynamic_gemlite

Rows (labelled with the kernel library, never as vLLM):
  w4a16_gemlite         every decoder linear as gemlite's A16W4 INT kernel, groups of 128,
                        symmetric (codes 0..15 around a zero of 8: compressed-tensors' int4
                        symmetric group scheme, the weight format of gptq_w4a16 / awq_w4a16 /
                        rtn_w4a16), fp16 activations;
  w8a8_dynamic_gemlite  every decoder linear as gemlite's A8W8 INT8 dynamic kernel (int8 weights
                        per output channel, int8 activations per token scaled at run time: the
                        scheme of w8a8_int8_dynamic), weights quantised by gemlite's from_linear.
The embeddings and lm_head stay fp16, as the recipes' ignore list keeps them. Speed depends on
a model's shape, not its values (gpu_bench.py's premise), so the int4 codes and their scales
are random; calibration (GPTQ, AWQ) changes the values, never the kernel's work.

Per row, besides gpu_bench.py's load / memory / TTFT / decode (HF eager, batch 1: at 8B its
per-token Python and launch overhead is a large share of a step):
  matmul_us_<N>x<K>      batch-1 time of each distinct decoder linear shape (triton's
                         do_bench_cudagraph, median: the kernel, without the Python dispatch
                         that eager calls add; `matmul_us_eager_*` beside it), and fp16's
                         (torch) on the same shape: the
                         weight-read-bound speed-up the format buys a decode step, free of HF's
                         overhead (`matmul_speedup_vs_fp16`: summed over one layer's linears);
  kernel_max_rel_err     each converted shape's output on random activations against the same
                         weights dequantised to fp16 (the int4 row: (q - 8) * scale), max of
                         |diff| / max|reference|: the kernel computes the format it claims.
"""
from __future__ import annotations

import time
from pathlib import Path

VARIANTS = ("w4a16_gemlite", "w8a8_dynamic_gemlite")
GROUP = 128
QUANT = {
    "w4a16_gemlite": {"name": "w4a16_gemlite", "family": "compressed-tensors", "method": "static",
                      "bits": 4, "scheme": "W4A16 int4 symmetric, group 128 (gptq_w4a16's format)",
                      "kernel": "gemlite A16W4 INT (Triton)", "runtime": "transformers + gemlite",
                      "weights": "random int4 codes and scales"},
    "w8a8_dynamic_gemlite": {"name": "w8a8_dynamic_gemlite", "family": "compressed-tensors",
                             "method": "dynamic", "bits": 8,
                             "scheme": "W8A8 int8, per-channel weights, dynamic per-token "
                                       "activations (w8a8_int8_dynamic's scheme)",
                             "kernel": "gemlite A8W8 INT8 dynamic (Triton)",
                             "runtime": "transformers + gemlite",
                             "weights": "the random fp16 model's, quantised by gemlite"},
}


def _linears(torch, model) -> list[tuple[object, str, object]]:
    """(parent module, attribute, nn.Linear) of every linear inside the decoder layers."""
    out = []
    for layer in model.model.layers:
        for parent in layer.modules():
            for attr, child in parent.named_children():
                if isinstance(child, torch.nn.Linear):
                    out.append((parent, attr, child))
    return out


def _int4(torch, n: int, k: int, dtype, device, seed: int):
    """Random int4 codes (0..15, zero 8) and group scales of an n x k weight."""
    gen = torch.Generator(device=device).manual_seed(seed)
    w_q = torch.randint(0, 16, (n, k), dtype=torch.uint8, device=device, generator=gen)
    scales = (torch.rand(n, k // GROUP, device=device, generator=gen) * 2e-3 + 1e-3).to(dtype)
    return w_q, scales, torch.full_like(scales, 8)


def convert(torch, model, variant: str, dtype, device: str) -> dict:
    """Swap every decoder linear for the variant's gemlite layer; returns the kernel check
    ({"kernel_max_rel_err": ...}) over the distinct shapes."""
    from gemlite.helper import A8W8_int8_dynamic, A16Wn
    worst, checked = 0.0, set()
    for i, (parent, attr, lin) in enumerate(_linears(torch, model)):
        n, k = lin.weight.shape
        if variant == "w4a16_gemlite":
            w_q, scales, zeros = _int4(torch, n, k, dtype, device, i)
            new = A16Wn(device=device, dtype=dtype).from_weights(w_q, scales, zeros, W_nbits=4,
                                                                 group_size=GROUP)
            ref_w = ((w_q.float() - 8) * scales.float().repeat_interleave(GROUP, 1)).to(dtype)
        else:
            ref_w = lin.weight.data.clone()
            new = A8W8_int8_dynamic(device=device, dtype=dtype).from_linear(lin)
        if (n, k) not in checked:  # the format it claims: against its weights in fp16
            checked.add((n, k))
            x = torch.randn(4, k, device=device, dtype=dtype)
            ref = x @ ref_w.t()
            worst = max(worst, float((new(x) - ref).abs().max() / ref.abs().max()))
        setattr(parent, attr, new)
        del ref_w
    torch.cuda.empty_cache()
    return {"kernel_max_rel_err": worst}


def matmul_times(torch, model_shape: dict, variant: str, dtype, device: str) -> dict:
    """Batch-1 time (us, triton do_bench median) of each decoder linear shape, fp16 and the
    variant's kernel, and the speed-up summed over one layer's linears."""
    import triton
    from gemlite.helper import A8W8_int8_dynamic, A16Wn
    h, inter = model_shape["hidden_size"], model_shape["intermediate_size"]
    heads, kv = model_shape["num_attention_heads"], model_shape["num_key_value_heads"]
    head_dim = h // heads
    # (out, in) of q, k, v, o, gate, up, down: one layer's linears
    layer = [(h, h), (kv * head_dim, h), (kv * head_dim, h), (h, h), (inter, h), (inter, h),
             (h, inter)]
    out, t16, tq = {}, 0.0, 0.0
    for n, k in dict.fromkeys(layer):
        w = torch.randn(n, k, device=device, dtype=dtype) * 0.02
        x = torch.randn(1, k, device=device, dtype=dtype)
        if variant == "w4a16_gemlite":
            new = A16Wn(device=device, dtype=dtype).from_weights(
                *_int4(torch, n, k, dtype, device, 0), W_nbits=4, group_size=GROUP)
        else:
            lin = torch.nn.Linear(k, n, bias=False, device=device, dtype=dtype)
            lin.weight.data.copy_(w)
            new = A8W8_int8_dynamic(device=device, dtype=dtype).from_linear(lin)
        f16, fq = (lambda x=x, w=w: x @ w.t()), (lambda x=x, new=new: new(x))
        fq()  # compiled (and autotuned where no config holds the shape) before any timing
        # replayed as a CUDA graph: the kernels' own time (eager, a ~20 us batch-1 kernel is
        # hidden behind gemlite's Python dispatch); eager kept beside it
        out[f"matmul_us_fp16_{n}x{k}"] = 1e3 * triton.testing.do_bench_cudagraph(
            f16, return_mode="median")
        out[f"matmul_us_{n}x{k}"] = 1e3 * triton.testing.do_bench_cudagraph(
            fq, return_mode="median")
        out[f"matmul_us_eager_fp16_{n}x{k}"] = 1e3 * triton.testing.do_bench(
            f16, return_mode="median")
        out[f"matmul_us_eager_{n}x{k}"] = 1e3 * triton.testing.do_bench(fq, return_mode="median")
    for n, k in layer:
        t16 += out[f"matmul_us_fp16_{n}x{k}"]
        tq += out[f"matmul_us_{n}x{k}"]
    out["matmul_us_layer_fp16"], out["matmul_us_layer"] = t16, tq
    out["matmul_speedup_vs_fp16"] = t16 / tq
    out["matmul_us_eager_layer"] = sum(out[f"matmul_us_eager_{n}x{k}"] for n, k in layer)
    out["matmul_us_eager_layer_fp16"] = sum(out[f"matmul_us_eager_fp16_{n}x{k}"]
                                            for n, k in layer)
    return out


def weight_bytes(torch, model) -> int:
    """Bytes of the model's parameters and buffers (gemlite keeps its packed weights, scales
    and zeros as buffers or plain tensor attributes: counted from the modules' tensors)."""
    seen, total = set(), 0
    for mod in model.modules():
        tensors = list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False))
        tensors += [v for v in vars(mod).values() if isinstance(v, torch.Tensor)]
        for t in tensors:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def measure(torch, folder, variant: str, dtype, device: str, prompt: list[int], args,
            model_shape: dict, runtime_of, measure_speed) -> dict:
    """gpu_bench.py's row for a gemlite variant: the fp16 folder loaded, its decoder linears
    converted, then the same speed protocol as every other row."""
    import gemlite
    from transformers import AutoModelForCausalLM
    config = None
    if torch.cuda.get_device_capability() == (9, 0):  # gemlite ships H100's tuned kernel
        # configs; an H200 (the same sm_90) would otherwise autotune every shape on first use
        config = Path(gemlite.__file__).parent / "configs" / "h100.json"
        gemlite.load_config(str(config), print_error=False)
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map=device)
    metrics = convert(torch, model, variant, dtype, device)
    torch.cuda.synchronize()
    metrics["load_s"] = time.perf_counter() - t0
    metrics["size_mb"] = weight_bytes(torch, model) / 2**20
    metrics["gpu_alloc_after_load_mb"] = torch.cuda.memory_allocated() / 2**20
    metrics.update(measure_speed(runtime_of(model), prompt, args.new_tokens, args.warmup,
                                 args.repeats))
    metrics["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    del model
    torch.cuda.empty_cache()
    metrics.update(matmul_times(torch, model_shape, variant, dtype, device))
    return {"metrics": metrics, "gemlite": {"version": _version("gemlite"),
                                            "config": config.name if config else "autotuned"}}


def _version(name: str) -> str:
    from importlib import metadata
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "unknown"
