"""GPU check: the scan on CUDA against the CPU scan and against the reference approach on the GPU.

Generates a bf16 Llama checkpoint, then runs in this process (GPU timings are synchronised):
  1. ours on the CPU (float64 Gram, all cores),
  2. ours on the GPU (float64 Gram, and exact float64 SVD),
  3. the reference approach on the GPU: whole model in float32 on the device, svdvals per matrix;
and prints wall times, ratios, peak GPU memory, and the largest snr difference between runs.

    python benchmarks/gpu_scan.py [--workdir gpu-run] [--layers 8] [--hidden 2048]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def scan(model_dir: Path, out: Path, **options) -> tuple[float, dict[str, float]]:
    import torch

    from stages import snr_scan
    from stages.core.stage import StageContext

    torch.cuda.synchronize()
    started = time.perf_counter()
    config = snr_scan.ScanConfig(model_dir=str(model_dir), output=str(out), overwrite=True, **options)
    result = snr_scan.run(config, StageContext(progress=False)).detail
    torch.cuda.synchronize()
    return time.perf_counter() - started, {r["module_name"]: r["snr"] for r in result.rows if r["scanned"]}


def reference_on_gpu(model_dir: Path) -> tuple[float, dict[str, float], float]:
    import torch
    from transformers import AutoModelForCausalLM

    from benchmarks.reference_scanner import reference_snr

    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, device_map="cuda")
    results = reference_snr(model)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 2**20
    del model
    torch.cuda.empty_cache()
    return seconds, results, peak


def worst_difference(a: dict[str, float], b: dict[str, float]) -> float:
    return max(abs(a[k] - v) / abs(v) for k, v in b.items() if math.isfinite(v) and v != 0)


def main() -> None:
    import torch

    from stages.sample_models.synthetic_model import SyntheticSpec, write_synthetic_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=str(ROOT / "gpu-run"))
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here; this check needs one")
    work = Path(args.workdir)
    model_dir = work / "model"
    spec = SyntheticSpec(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=max(1, args.hidden // 512),
        vocab_size=32000,
        max_shard_bytes=500 * 2**20,
    )
    if not (model_dir / "config.json").exists():
        write_synthetic_model(model_dir, spec)
    print(f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}; CPU threads {torch.get_num_threads()}")

    scan(model_dir, work / "warmup.parquet", device="cuda", include=["self_attn.q_proj"])  # CUDA/cuSOLVER start-up
    cpu_s, cpu = scan(model_dir, work / "cpu.parquet", device="cpu")
    torch.cuda.reset_peak_memory_stats()
    gpu_s, gpu = scan(model_dir, work / "gpu.parquet", device="cuda")
    gpu_peak = torch.cuda.max_memory_allocated() / 2**20
    svd_s, svd = scan(model_dir, work / "gpu-svd.parquet", device="cuda", svd_method="svd")
    ref_s, ref, ref_peak = reference_on_gpu(model_dir)

    print(f"matrices: {len(cpu)}")
    print(f"ours, CPU gram:          {cpu_s:7.2f} s")
    print(f"ours, GPU gram:          {gpu_s:7.2f} s  peak GPU memory {gpu_peak:7.0f} MiB  ({cpu_s / gpu_s:.1f}x the CPU scan)")
    print(f"ours, GPU exact SVD:     {svd_s:7.2f} s")
    print(f"reference on the GPU:    {ref_s:7.2f} s  peak GPU memory {ref_peak:7.0f} MiB")
    print(f"speed-up vs reference on GPU: {ref_s / gpu_s:.2f}x; GPU memory {gpu_peak / ref_peak:.2f} of the reference")
    print(
        f"worst snr difference: GPU gram vs CPU gram {worst_difference(gpu, cpu):.1e}, "
        f"GPU svd vs CPU gram {worst_difference(svd, cpu):.1e}, "
        f"CPU gram vs reference float32 {worst_difference(cpu, ref):.1e}"
    )


if __name__ == "__main__":
    main()
