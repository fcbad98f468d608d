"""Ctrl-C never loses work: real SIGINTs at random moments, then a resume, give the uninterrupted
run bit for bit (weights, optimizer and scheduler states, RNG, history); a second Ctrl-C stops at
once and keeps the last checkpoint.

The subprocess test runs this file as a script (``python test_robustness_interrupts.py ROOT``):
a server process that imports torch and transformers once (about 8 s on a busy 2-core machine)
and then forks one fresh process per training run, sends each run a SIGINT at a random moment
of its training loop (a few land after its end), and resumes every run in another fresh process,
two runs at a time. Every run's final checkpoint holds its whole state; the test compares them
with the uninterrupted run's.
"""

import json
import math
import os
import random
import select
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch

from focalpo_mini.checkpoint import read as read_checkpoint
from focalpo_mini.data import make_preference_dataset
from focalpo_mini.losses import focalpo_loss
from focalpo_mini.tiny import make_model
from focalpo_mini.trainer import TrainConfig, train

RUNS = 30  # interrupted runs: at least 20 must land mid-run (the test checks)
PARALLEL = 2
MAX_STEPS = 8
SETTINGS = {
    "batch_size": 4,
    "grad_accum_steps": 2,
    "max_steps": MAX_STEPS,
    "learning_rate": 1e-3,
    "warmup_steps": 2,
    "log_every": 2,
    "eval_every": 3,
    "checkpoint_every": 4,  # so the final checkpoint, at step 8, holds the finished state
    "progress": False,
}


def tiny_model(tokenizer):
    return make_model(
        tokenizer,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )


def datasets():
    # 28 pairs: 3 micro-batches of 4 a epoch (the 4 left over are dropped), so epochs roll over
    return make_preference_dataset(28, seed=0), make_preference_dataset(8, seed=1)


def server(root: Path) -> None:
    """Run the reference, then RUNS interrupted runs and their resumptions, PARALLEL at a time,
    each in a forked process; write ``root/summary.json``."""
    from transformers import PreTrainedTokenizerFast

    torch.set_num_threads(1)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(root / "tokenizer")
    train_set, eval_set = datasets()

    def fork_run(run_dir: Path) -> tuple[int, int]:
        """Start one training run (resumed when ``run_dir`` holds a checkpoint); return its pid
        and a pipe that receives a byte when the training loop starts (after the step-0
        evaluation, through ``on_eval``)."""
        started_r, started_w = os.pipe()
        pid = os.fork()
        if pid:
            os.close(started_w)
            return pid, started_r
        code = 0
        try:  # the child: one training run, then exit
            resume = run_dir / "checkpoint.pt"
            train(
                tiny_model(tokenizer),
                tokenizer,
                train_set,
                eval_set,
                config=TrainConfig(**SETTINGS, checkpoint_dir=str(run_dir)),
                resume_from=resume if resume.exists() else None,
                on_eval=lambda step, model: step == 0 and os.write(started_w, b"s"),
            )
        except KeyboardInterrupt:
            code = 130
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)

    def wait(pid: int) -> int:
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

    pid, started = fork_run(root / "reference")
    os.read(started, 1)
    loop_start = time.perf_counter()
    assert wait(pid) == 0
    loop_seconds = time.perf_counter() - loop_start
    # Delays after the loop starts, up to 0.6 of the reference run's loop: the signals land in
    # steps, evaluations, log rows and checkpoints, and (the loop's length varies with the load
    # of the machine) a few in the last step or after the end.
    rng = random.Random(0)
    delays = [rng.uniform(0.0, 0.6 * loop_seconds) for _ in range(RUNS)]
    codes, landed, resumed = [], [], []
    for first in range(0, RUNS, PARALLEL):
        batch = range(first, min(first + PARALLEL, RUNS))
        runs = {i: fork_run(root / f"run{i}") for i in batch}
        waiting = {runs[i][1]: i for i in batch}  # pipe -> run, until its loop starts
        due = {}  # run -> when to send its SIGINT
        while waiting or due:
            timeout = max(0.0, min(due.values()) - time.perf_counter()) if due else None
            for pipe in select.select(list(waiting), [], [], timeout)[0]:
                i = waiting.pop(pipe)
                if os.read(pipe, 1):  # b"" means the run ended before its loop started
                    due[i] = time.perf_counter() + delays[i]
            for i, when in list(due.items()):
                if when <= time.perf_counter():
                    os.kill(runs[i][0], signal.SIGINT)
                    del due[i]
        for i in batch:
            codes.append(wait(runs[i][0]))
            os.close(runs[i][1])
            path = root / f"run{i}" / "checkpoint.pt"
            landed.append(read_checkpoint(path)["progress"]["step"] if path.exists() else None)
        # resume every run, interrupted or not (a finished run has nothing left to do)
        resumptions = [fork_run(root / f"run{i}") for i in batch]
        resumed += [wait(pid) for pid, _ in resumptions]
        for _, pipe in resumptions:
            os.close(pipe)
    summary = {
        "loop_seconds": loop_seconds,
        "delays": delays,
        "exit_codes": codes,
        "checkpoint_step_at_interrupt": landed,
        "resume_exit_codes": resumed,
    }
    (root / "summary.json").write_text(json.dumps(summary))


def same_state(a, b) -> bool:
    """Bit-identical nested states: tensors by torch.equal, NaN equal to NaN."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return (
            isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
        )
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b


def final_state(run_dir: Path) -> dict:
    state = read_checkpoint(run_dir / "checkpoint.pt")
    del state["config"]  # it names the checkpoint_dir, which differs from run to run
    return state


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the server forks one process per run")
def test_real_sigints_at_random_moments_resume_bit_identically(tokenizer, tmp_path):
    started = time.perf_counter()
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    subprocess.run([sys.executable, __file__, str(tmp_path)], check=True, env=env, timeout=600)
    summary = json.loads((tmp_path / "summary.json").read_text())
    reference = final_state(tmp_path / "reference")
    assert reference["progress"]["step"] == MAX_STEPS
    assert [r["step"] for r in reference["progress"]["eval_history"]] == [0, 3, 6, 8]
    # 130: stopped by the KeyboardInterrupt; 0: the signal came after the run had finished
    assert set(summary["exit_codes"]) <= {0, 130}, summary
    assert summary["resume_exit_codes"] == [0] * RUNS, summary
    different = [
        i for i in range(RUNS) if not same_state(final_state(tmp_path / f"run{i}"), reference)
    ]
    landed = summary["checkpoint_step_at_interrupt"]
    print(f"\ncheckpoint steps at the interrupts: {landed}; {time.perf_counter() - started:.0f} s")
    assert different == [], summary
    # The test is only as good as where the signals landed: most must stop a run mid-way.
    interrupted = [
        step
        for step, code in zip(landed, summary["exit_codes"], strict=True)
        if code == 130 and step is not None and step < MAX_STEPS
    ]
    assert len(interrupted) >= 20, summary


class SignalAt:
    """A FocalPO loss that sends this process SIGINT (``times`` of them) on its ``call``-th call,
    as a Ctrl-C in the middle of a micro-batch would."""

    def __init__(self, call=None, times=1):
        self.call, self.times, self.calls = call, times, 0

    def __call__(self, *logps, **kwargs):
        self.calls += 1
        if self.calls == self.call:
            for _ in range(self.times):
                os.kill(os.getpid(), signal.SIGINT)
        return focalpo_loss(*logps, **kwargs)


@pytest.fixture(autouse=True)
def ctrl_c_raises():
    """Python's own SIGINT handler for these tests. A process started in the background by a
    non-interactive shell (``cmd &``, as CI runners and nohup do) inherits SIGINT *ignored*;
    Python then leaves it ignored, and so does the trainer, so no Ctrl-C could reach a run."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture
def one_thread_here():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread_here")
def test_ctrl_c_waits_for_the_end_of_the_step(tokenizer, tmp_path):
    settings = {**SETTINGS, "checkpoint_every": 0}
    train_set, eval_set = datasets()
    reference_model = tiny_model(tokenizer)
    reference = train(
        reference_model,
        tokenizer,
        train_set,
        eval_set,
        config=TrainConfig(**settings, loss=SignalAt()),
    )
    # Loss calls: 1 is the evaluation at step 0, then two per step and one per evaluation, so
    # call 9 is the first micro-batch of step 4: the step still completes, with its log row.
    config = TrainConfig(**settings, loss=SignalAt(9), checkpoint_dir=str(tmp_path))
    model = tiny_model(tokenizer)
    with pytest.raises(KeyboardInterrupt):
        train(model, tokenizer, train_set, eval_set, config=config)
    state = read_checkpoint(tmp_path)
    assert state["progress"]["step"] == 4
    assert [r["step"] for r in state["progress"]["history"]] == [2, 4]
    assert model.training
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored

    resumed_model = tiny_model(tokenizer)
    resumed = train(
        resumed_model,
        tokenizer,
        train_set,
        eval_set,
        config=TrainConfig(**settings, loss=SignalAt()),
        resume_from=tmp_path,
    )
    assert same_state(resumed.history, reference.history)
    assert same_state(resumed.eval_history, reference.eval_history)
    assert same_state(resumed_model.state_dict(), reference_model.state_dict())


@pytest.mark.usefixtures("one_thread_here")
def test_a_second_ctrl_c_stops_at_once_and_keeps_the_last_checkpoint(tokenizer, tmp_path):
    settings = {**SETTINGS, "checkpoint_every": 2}
    config = TrainConfig(**settings, loss=SignalAt(9, times=2), checkpoint_dir=str(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        train(tiny_model(tokenizer), tokenizer, *datasets(), config=config)
    assert read_checkpoint(tmp_path)["progress"]["step"] == 2  # not the half-done step 4
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_interrupt_inside_a_step_keeps_num_tokens_and_pending_rows(tokenizer, tmp_path):
    """A KeyboardInterrupt raised by the loss in micro-batch 2 must not count micro-batch 1's
    tokens; an interrupt before a log row or evaluation is recorded is redone on resume."""

    class RaiseAt(SignalAt):
        def __call__(self, *logps, **kwargs):
            self.calls += 1
            if self.calls == self.call:
                raise KeyboardInterrupt
            return focalpo_loss(*logps, **kwargs)

    settings = {**SETTINGS, "checkpoint_every": 0}
    train_set, eval_set = datasets()
    reference = train(
        tiny_model(tokenizer),
        tokenizer,
        train_set,
        eval_set,
        config=TrainConfig(**settings, loss=RaiseAt()),
    )
    # call 7 is the second micro-batch of step 3 (see the test above for the count)
    config = TrainConfig(**settings, loss=RaiseAt(7), checkpoint_dir=str(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        train(tiny_model(tokenizer), tokenizer, train_set, eval_set, config=config)
    progress = read_checkpoint(tmp_path)["progress"]
    assert progress["step"] == 2
    assert progress["num_tokens"] == reference.history[0]["num_tokens"]  # after step 2

    # Call 15 is the evaluation at step 6: the checkpoint is at step 6, without that evaluation.
    config = TrainConfig(**settings, loss=RaiseAt(15), checkpoint_dir=str(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        train(tiny_model(tokenizer), tokenizer, train_set, eval_set, config=config)
    progress = read_checkpoint(tmp_path)["progress"]
    assert progress["step"] == 6
    assert [r["step"] for r in progress["eval_history"]] == [0, 3]
    resumed = train(
        tiny_model(tokenizer),
        tokenizer,
        train_set,
        eval_set,
        config=TrainConfig(**settings, loss=RaiseAt()),
        resume_from=tmp_path,
    )
    assert [r["step"] for r in resumed.eval_history] == [0, 3, 6, 8]
    assert same_state(resumed.eval_history, reference.eval_history)
    assert same_state(resumed.history, reference.history)


if __name__ == "__main__":
    server(Path(sys.argv[1]))
