"""The names quantpipe's MLflow runs carry: run kinds, stage names, tag keys, metric names.

Stages write them (pipeline.py, evaluate/, deploy/, pipelines/gpu_import.py, benchmarks/); the
report, registry, server and crosscheck read them. Each name is spelled here once, so a rename
reaches writer and reader together; tests/test_names.py runs the tiny pipeline and checks that
every metric the report reads from a variant run is one the run wrote (a renamed metric fails
there instead of printing "—").

    from quantpipe.names import Kind, Metric, Stage, Tag
    mlflow.start_run(tags={Tag.KIND: Kind.VARIANT, Tag.QUANT_NAME: "int4"})
"""
from __future__ import annotations


class Kind:
    """Values of the tag `quantpipe.kind`: what a run is."""
    VARIANT = "variant"          # one `make pipeline` invocation (one quant variant)
    SWEEP = "sweep"              # the parent of a multirun's variant runs
    STAGE = "stage"              # a nested stage run (its name in quantpipe.stage)
    ADAPTER = "adapter"          # `make adapter`
    GPU_BENCH = "gpu_bench"      # a record imported by `make gpu-import`
    DEPLOY = "deploy"            # `make smoke`
    BENCHMARK = "benchmark"      # `make bench`, benchmarks/scale.py
    CROSSCHECK = "crosscheck"    # pipelines/crosscheck.py


class Stage:
    """Values of the tag `quantpipe.stage`; also the stage cache folders under artifacts/."""
    BASE = "base"
    ADAPTER = "adapter"
    MERGE = "merge"
    QUANTISE = "quantise"
    EVALUATE = "evaluate"
    PUBLISH = "publish"
    DEPLOY = "deploy"


class Artifact:
    """Files a stage run logs that another reader loads."""
    # the evaluate stage's per-window means (windows_sha256, kld, nll, nll_fp16): the report's
    # paired comparisons of two variants scored on the same windows
    PER_WINDOW = "per_window.json"


class Tag:
    """Tag keys of runs (and of registered model versions, at the end)."""
    KIND = "quantpipe.kind"
    STAGE = "quantpipe.stage"
    FINGERPRINT = "quantpipe.fingerprint"   # the stage's cache key
    REUSED = "quantpipe.reused"             # "true" | "false" | "external" (a user's folder)
    ARTIFACT = "quantpipe.artifact"         # the stage's output, relative to paths.root
    PUBLISHED = "quantpipe.published"       # the published model, relative to paths.root
    MODEL_FINGERPRINT = "quantpipe.model_fingerprint"  # publish run holding a copy of this model
    ERROR = "quantpipe.error"
    DEPLOY_SERVER = "deploy.server"              # a deploy run's server: llama.cpp | vllm
    DEPLOY_CONCURRENCY = "deploy.concurrency"    # a deploy run's requests in flight at once
    RECOVERED = "quantpipe.recovered"
    PID = "quantpipe.pid"
    PID_START = "quantpipe.pid_start"
    HOST = "quantpipe.host"
    VARIANT_RUN = "quantpipe.variant_run"   # deploy run -> the variant run that published it
    BENCHMARK_NAME = "benchmark.name"       # a benchmark run's script: gguf_stage, scale_pipeline
    IMPORT_KEY = "quantpipe.import_key"     # gpu_bench run -> <file sha256>:<index>:<record>
    QUANT_NAME = "quant.name"
    QUANT_FAMILY = "quant.family"
    QUANT_METHOD = "quant.method"
    GATE = "gate"                           # Gate.PASSED | Gate.FAILED
    GATE_REASON = "gate.reason"
    BASE_SOURCE = "base.source"
    EVAL_RUNTIME = "eval.runtime"
    GIT_SHA = "git.sha"
    REGISTRY_VERSION = "registry.version"
    SHAPE = "shape"                         # gpu_bench: the model shape measured
    HARDWARE_GPU = "hardware.gpu"
    VERSION_PREFIX = "version."             # version.<library>
    HARDWARE_PREFIX = "hardware."           # hardware.<field>
    PARENT_RUN = "mlflow.parentRunId"       # MLflow's own
    # tags of a registered model version (quantpipe.registry)
    MERGED_FINGERPRINT = "merged.fingerprint"
    VARIANT_RUN_ID = "variant_run_id"
    PUBLISH_RUN_ID = "publish_run_id"       # the run that registered it (its run_id: the bytes')
    METRIC_PREFIX = "metric."               # metric.<name> = repr(value)
    REGISTERING = "registering"             # until the champion is re-elected (registry.py)


class Gate:
    """Values of the tag `gate`."""
    PASSED = "passed"
    FAILED = "failed"


class Metric:
    """Metric names. A variant run logs the evaluation's; stage runs log their own."""
    # evaluation of a variant (quantpipe.evaluate): size
    SIZE_MB = "size_mb"
    FP16_SIZE_MB = "fp16_size_mb"
    COMPRESSION = "compression"
    BITS_PER_WEIGHT = "bits_per_weight"
    # speed and memory (quantpipe.evaluate.worker)
    LOAD_S = "load_s"
    TTFT_MS = "ttft_ms"
    PREFILL_TOK_S = "prefill_tok_s"
    DECODE_TOK_S = "decode_tok_s"
    DECODE_TOK_S_MIN = "decode_tok_s_min"
    DECODE_TOK_S_MAX = "decode_tok_s_max"
    PEAK_RSS_MB = "peak_rss_mb"
    PEAK_GPU_MB = "peak_gpu_mb"
    GPU_PROCESS_PEAK_MB = "gpu_process_peak_mb"  # NVML: the whole process, CUDA context included
    # quality against FP16
    PPL = "ppl"
    PPL_ERR = "ppl_err"
    PPL_FP16 = "ppl_fp16"
    PPL_RATIO = "ppl_ratio"
    DELTA_PPL_PCT = "delta_ppl_pct"
    DELTA_PPL_CI95_LOW = "delta_ppl_ci95_low"
    DELTA_PPL_CI95_HIGH = "delta_ppl_ci95_high"
    KLD_MEAN = "kld_mean"
    KLD_CI95_LOW = "kld_ci95_low"
    KLD_CI95_HIGH = "kld_ci95_high"
    KLD_P99 = "kld_p99"
    KLD_MAX = "kld_max"
    KLD_REF_TAIL_MASS = "kld_ref_tail_mass"
    TOP1_AGREE_PCT = "top1_agree_pct"
    EVAL_TOKENS_SCORED = "eval_tokens_scored"
    EVAL_WINDOWS_SCORED = "eval_windows_scored"    # fewer than planned when eval.max_minutes ends
    EVAL_WINDOWS_PLANNED = "eval_windows_planned"
    # fine-tune retention (the base model without the adapter, same token ids)
    BASE_PPL = "base_ppl"
    FINETUNE_RETENTION_PCT = "finetune_retention_pct"
    # generation agreement with FP16's greedy continuations
    GEN_PREFIX_MATCH_PCT = "gen_prefix_match_pct"
    GEN_MEAN_MATCH_LEN = "gen_mean_match_len"
    TASK_EXACT_MATCH_PCT = "task_exact_match_pct"  # with eval.tasks_file only
    TASK_ROUGE_L_PCT = "task_rouge_l_pct"
    # stage runs
    N_PARAMS = "n_params"
    # base stage, also on the variant run: % of blocks of 32 weights holding <= 16 distinct
    # values, i.e. on a 4-bit block grid (quantpipe.gridcheck)
    GRID_ALIGNED_PCT = "grid_aligned_pct"
    CONVERT_S = "convert_s"
    QUANTIZE_S = "quantize_s"
    SMOKE_STOPPED_AT_EOS = "smoke_stopped_at_eos"
    # deploy runs (quantpipe.deploy.loadtest)
    DEPLOY_READY_S = "deploy_ready_s"
    DEPLOY_REQUESTS = "deploy_requests"
    DEPLOY_ERRORS = "deploy_errors"
    DEPLOY_WALL_S = "deploy_wall_s"
    DEPLOY_SMOKE_OK = "deploy_smoke_ok"
    DEPLOY_SMOKE_LATENCY_MS = "deploy_smoke_latency_ms"
    DEPLOY_SMOKE_COMPLETION_TOKENS = "deploy_smoke_completion_tokens"
    DEPLOY_LATENCY_P50_MS = "deploy_latency_p50_ms"
    DEPLOY_LATENCY_P90_MS = "deploy_latency_p90_ms"
    DEPLOY_LATENCY_P99_MS = "deploy_latency_p99_ms"
    DEPLOY_LATENCY_MAX_MS = "deploy_latency_max_ms"
    DEPLOY_COMPLETION_TOKENS = "deploy_completion_tokens"
    DEPLOY_TOK_S = "deploy_tok_s"
    DEPLOY_REQUEST_TOK_S_MEAN = "deploy_request_tok_s_mean"


def values(group: type) -> set[str]:
    """Every name a group holds, e.g. values(Metric)."""
    return {v for k, v in vars(group).items() if k.isupper() and isinstance(v, str)}
