"""Where the time of a training step goes, operator by operator (``torch.profiler``).

    python bench/profile_step.py                          # RT, MiniLM, batch 32: top operators of 20 steps
    python bench/profile_step.py --no-fast_dropout        # the same with PyTorch's own dropout
    python bench/profile_step.py --dataset embedded:imdb --max_length 512 --batch_size 16 --steps 4

Runs our loop's ``train_step`` on length-grouped batches (after a few untimed warm-up steps) under the
profiler and prints the operators that took the most time of their own. This is how the dropout cost
on CPU was found: with PyTorch's dropout, ``aten::bernoulli_`` was a third of every step
(bench/README.md). Every ``train_loop.py`` flag is accepted; ``--steps``, ``--warmup`` and ``--top``
are this script's own.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_speed  # noqa: E402
import train_loop  # noqa: E402


def profile_steps(cfg: train_loop.TrainConfig, steps: int, warmup: int):
    """Profile ``steps`` optimizer steps of our loop after ``warmup`` unprofiled ones; returns
    ``(profiler, seconds)``. Uses the bench's job and model setup, so it is the loop the bench times."""
    job = bench_speed.prepare_job(dataclasses.replace(cfg, max_steps=steps + warmup))
    run = bench_speed.setup_our_loop(job, cfg.group_by_length, cfg.fast_dropout, steps + warmup)
    run.model.train()
    run.train_loader.set_epoch(0)
    # Batches are fetched before profiling (at most one epoch's): the profile shows the step itself.
    windows = list(itertools.islice(train_loop.accumulation_windows(run.train_loader, cfg.gradient_accumulation_steps),
                                    steps + warmup))
    for window in windows[:warmup]:
        train_loop.train_step(run.model, run.optimizer, run.scheduler, window, run.accelerator, cfg.max_grad_norm)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if job.on_gpu else [])
    started = time.perf_counter()
    with profile(activities=activities) as profiler:
        for window in windows[warmup:]:
            train_loop.train_step(run.model, run.optimizer, run.scheduler, window, run.accelerator, cfg.max_grad_norm)
    return profiler, time.perf_counter() - started


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps to profile")
    parser.add_argument("--warmup", type=int, default=3, help="unprofiled steps first")
    parser.add_argument("--top", type=int, default=15, help="operators to list")
    own, train_flags = parser.parse_known_args(argv)
    cfg = train_loop.parse_config(train_flags)
    profiler, seconds = profile_steps(cfg, own.steps, own.warmup)
    print(f"{own.steps} steps in {seconds:.1f} s under the profiler ({1000 * seconds / own.steps:.0f} ms per step); "
          f"fast_dropout={cfg.fast_dropout}, group_by_length={cfg.group_by_length}")
    sort_by = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    print(profiler.key_averages().table(sort_by=sort_by, row_limit=own.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
