"""Benchmark: how fast a command starts, against importing every command (what `spectrum` did before it imported lazily),
and a first training start in a fresh venv or container (no compiled DeepSpeed op yet) against one that compiles it.

Each measurement is a child process timed by the parent, its peak RSS read from /proc (VmHWM, via resource.getrusage of
the child). Run on a quiet machine: a busy one inflates imports most.

    python benchmarks/startup.py [--repeat 5] [--no-training] [--demo]

--demo also times `spectrum demo --generations 3` (what `make demo` runs): its first start in a fresh workdir, then
--repeat runs again, every stage reused and every drop decided (the median is the cached demo's time).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPEC_FIELDS = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
BEFORE = "from spectrum_cli.main import build_parser; build_parser([], every_command=True)"  # every command's module imported


def timed(command: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one child run (its own rusage, from wait4)."""
    started = time.perf_counter()
    child = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = child.stderr.read()
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{stderr.decode(errors='replace')[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def best_of(command: list[str], repeat: int) -> tuple[float, float]:
    runs = [timed(command) for _ in range(repeat)]
    return statistics.median(w for w, _ in runs), max(m for _, m in runs)


def training(workdir: Path, compile_op: bool) -> float:
    """Seconds of a 2-step cpt of a tiny model with an empty TORCH_EXTENSIONS_DIR: ours, or forced to build the op first."""
    from stages.sample_models.synthetic_model import SyntheticSpec, write_synthetic_model
    from stages.sample_models.tokenizer import domain_corpus, write_tokenizer

    SPEC = SyntheticSpec(**SPEC_FIELDS)
    corpus = domain_corpus(120)
    model = workdir / "model"
    if not model.exists():
        write_tokenizer(
            write_synthetic_model(model, SPEC),
            corpus,
            512,
        )
        (workdir / "drop").mkdir()
        (workdir / "drop" / "part.txt").write_text("\n".join(corpus) + "\n")
    extensions = Path(tempfile.mkdtemp(prefix="ext-", dir=workdir))
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions), "PYTHONPATH": str(ROOT)}
    prefix = "from stages.training.opbuild import build_ops; build_ops(); " if compile_op else ""
    run = "import sys; from stages.cpt import STAGE; from stages.core.cli import stage_main; sys.exit(stage_main(STAGE))"
    argv = [str(model), "--data", str(workdir / "drop"), "--full", "--store", str(extensions / "store"), "--max-steps", "2"]
    argv += ["--seq-len", "32", "--save-steps", "0", "--no-progress", "--work-dir", str(extensions / "work")]
    wall, _ = timed([sys.executable, "-c", prefix + run, *argv], env)
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--no-training", action="store_true", help="skip the first-training-start measurement (minutes)")
    parser.add_argument("--demo", action="store_true", help="also time `spectrum demo --generations 3`, first and cached (minutes)")
    parser.add_argument("--workdir", default="benchmark-run/startup")
    args = parser.parse_args()
    spectrum = [sys.executable, "-m", "spectrum_cli.main"]
    rows = [("every command imported (before)", best_of([sys.executable, "-c", BEFORE], args.repeat))]
    for argv in (["--version"], ["--help"], ["scan", "--help"], ["runs", "--help"]):
        rows.append((f"spectrum {' '.join(argv)}", best_of([*spectrum, *argv], args.repeat)))
    base = rows[0][1][0]
    print(f"{'command':34} {'median s':>9} {'peak MiB':>9} {'vs before':>10}")
    for name, (wall, rss) in rows:
        print(f"{name:34} {wall:9.3f} {rss:9.0f} {wall / base:10.2f}")
    if not args.no_training:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        compiled, ours = training(workdir, compile_op=True), training(workdir, compile_op=False)
        print(
            f"\nfirst training start, fresh TORCH_EXTENSIONS_DIR: op compiled {compiled:.1f} s, ours {ours:.1f} s ({ours / compiled:.2f})"
        )
    if args.demo:
        demo = Path(tempfile.mkdtemp(prefix="demo-"))
        command = [*spectrum, "demo", "--workdir", str(demo), "--generations", "3"]
        first, first_rss = timed(command)
        cached = [timed(command) for _ in range(args.repeat)]
        walls = sorted(w for w, _ in cached)
        print(
            f"\nspectrum demo --generations 3: first start {first:.1f} s ({first_rss:.0f} MiB); cached (every stage reused) "
            f"median {statistics.median(walls):.2f} s, range {walls[0]:.2f}-{walls[-1]:.2f} s over {len(walls)} runs, "
            f"peak {max(m for _, m in cached):.0f} MiB"
        )
        shutil.rmtree(demo, ignore_errors=True)


if __name__ == "__main__":
    main()
