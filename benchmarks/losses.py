"""Time focalpo_loss against dpo_loss, forward and forward+backward, and print a table.

Run: ``.venv/bin/python benchmarks/losses.py [threads]``. Times are milliseconds of the process's
CPU time (not wall time, so waiting for a busy machine's cores is not counted), float32, one thread
unless told more. torch.utils.benchmark warms up and repeats each call; the losses take turns for
several rounds and the table shows the median over rounds. "input checks" is the part of every
call spent validating the four tensors (mostly the NaN/inf check).

The aim is FocalPO within 1.5x of DPO. FocalPO's extra work is inherent to its formula: forward,
an exp and two multiplications a pair on top of DPO's logsigmoid; backward with the factor in the
graph, about four more elementwise products (detached, one). At small batches the fixed cost of a
call dominates and the ratio stays near 1; at large ones the loss is pure elementwise math and the
ratio approaches that of the bare formulas, which a hand-written autograd.Function does not beat.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
from torch.utils import benchmark

from focalpo_mini._checks import check_pair_logps
from focalpo_mini.losses import dpo_loss, focalpo_loss

SIZES = [1_000, 16_000, 256_000]
ROUNDS = 15
LOSSES = {
    "dpo": lambda logps: dpo_loss(*logps, beta=0.1),
    "focalpo": lambda logps: focalpo_loss(*logps, beta=0.1, gamma=0.5),
    "focalpo detached": lambda logps: focalpo_loss(*logps, beta=0.1, gamma=0.5, detach_weight=True),
}
NAMES = ["policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps"]


def forward_backward(loss_fn, logps):
    for t in logps:
        t.grad = None
    loss_fn(logps).backward()


def input_checks(logps):
    check_pair_logps(**dict(zip(NAMES, logps, strict=True)))


def median_ms(stmt, logps, loss_fn=None):
    timer = benchmark.Timer(
        stmt=stmt,
        globals={
            "loss_fn": loss_fn,
            "logps": logps,
            "fb": forward_backward,
            "checks": input_checks,
        },
        num_threads=torch.get_num_threads(),
        timer=time.process_time,
    )
    return timer.blocked_autorange(min_run_time=0.05).median * 1e3


def time_size(n):
    """Median over rounds of (forward ms, forward+backward ms) per loss, and of the checks alone."""
    logps = [(-50 * torch.rand(n)).requires_grad_() for _ in range(4)]
    rounds = {name: [] for name in LOSSES}
    checks = []
    for _ in range(ROUNDS):
        for name, loss_fn in LOSSES.items():
            with torch.no_grad():
                forward = median_ms("loss_fn(logps)", logps, loss_fn)
            rounds[name].append((forward, median_ms("fb(loss_fn, logps)", logps, loss_fn)))
        checks.append(median_ms("checks(logps)", logps))
    medians = {
        name: tuple(statistics.median(column) for column in zip(*times, strict=True))
        for name, times in rounds.items()
    }
    return medians, statistics.median(checks)


def main():
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), float32, CPU time in ms"
    )
    header = f"{'pairs':>8} {'loss':>17} {'forward':>9} {'ratio':>6} {'fwd+bwd':>9} {'ratio':>6}"
    print(header)
    print("-" * len(header))
    for n in SIZES:
        medians, checks = time_size(n)
        dpo_forward, dpo_both = medians["dpo"]
        for name, (forward, both) in medians.items():
            print(
                f"{n:>8} {name:>17} {forward:>9.3f} {forward / dpo_forward:>6.2f}"
                f" {both:>9.3f} {both / dpo_both:>6.2f}"
            )
        print(f"{n:>8} {'input checks':>17} {checks:>9.3f} {checks / dpo_forward:>6.2f}")


if __name__ == "__main__":
    main()
