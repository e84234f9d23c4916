"""The training benchmark on one GPU: a 1B-class Llama shape, bf16 (cpt's default on a GPU), ZeRO-2.

Same arms and ratios as benchmarks/train_vs_full.py (it runs that script), with peak GPU memory
from torch.cuda.max_memory_allocated as each step recorded it. A few minutes on one H100.

    python benchmarks/train_gpu.py [--steps 20]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.train_vs_full import main  # noqa: E402

ONE_B = ["--layers", "16", "--hidden", "2048", "--intermediate", "5632", "--vocab", "32000", "--seq-len", "1024", "--steps", "20"]

if __name__ == "__main__":
    main([*ONE_B, "--gpu", "--workdir", str(Path(__file__).resolve().parent.parent / "benchmark-run" / "train-gpu"), *sys.argv[1:]])
