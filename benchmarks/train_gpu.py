"""The training benchmark on one GPU: a 1B-class Llama shape, bf16 (cpt's default on a GPU), ZeRO-2.

Same arms and ratios as benchmarks/train_vs_full.py (it runs that script), with peak GPU memory
from torch.cuda.max_memory_allocated as each step recorded it. A few minutes on one H100.

    python benchmarks/train_gpu.py [--steps 20]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.train_vs_full import Shape, main  # noqa: E402

ONE_B_SHAPE = Shape(layers=16, hidden=2048, intermediate=5632, vocab=32000)  # 0.95B parameters
ONE_B_SEQ_LEN = 1024
ONE_B = [
    *("--layers", str(ONE_B_SHAPE.layers), "--hidden", str(ONE_B_SHAPE.hidden), "--intermediate", str(ONE_B_SHAPE.intermediate)),
    *("--vocab", str(ONE_B_SHAPE.vocab), "--seq-len", str(ONE_B_SEQ_LEN), "--steps", "20"),
]

if __name__ == "__main__":
    main([*ONE_B, "--gpu", "--workdir", str(Path(__file__).resolve().parent.parent / "benchmark-run" / "train-gpu"), *sys.argv[1:]])
