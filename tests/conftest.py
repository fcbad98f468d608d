"""Shared test set-up: no test reaches a model hub, the tiny tokenizer is built once, the
training tests share one small model and one intra-op thread, and hypothesis runs a fixed,
bounded set of examples (the "ci" profile)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest
import torch
from hypothesis import HealthCheck, settings

# Every hypothesis test runs the same examples on every run and machine (derandomize: the examples
# follow from the test itself, not from a random seed or a saved database), with bounded counts
# (each test's @settings(max_examples=...) caps its own) and no per-example deadline, since a
# shared CI core can stall any single call. HYPOTHESIS_PROFILE=explore draws new random examples
# on every run, for a robustness pass by hand.
settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=50,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "explore",
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def tokenizer():
    from focalpo_mini.tiny import make_tokenizer

    return make_tokenizer()


@pytest.fixture
def small_model(tokenizer):
    """``small_model(seed=0)``: a one-layer model of the tiny world, small enough to train in
    a test."""
    from focalpo_mini.tiny import make_model

    def make(seed=0):
        return make_model(
            tokenizer,
            seed=seed,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )

    return make


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module that trains tiny models: on a shared 2-core machine a
    second thread only adds contention (it made the trainer tests several times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def trl_step_zero(tokenizer, tmp_path_factory):
    """``trl_step_zero(dataset, beta=0.1)``: one step of TRL 1.16's own DPOTrainer on ``dataset``
    as a single batch, policy seed 0 and reference seed 1 (so rewards are not all zero).

    Returns the collated ``batch``, TRL's per-pair log-probs of the policy and the reference on
    it before the step (``policy_chosen_logps``, ..., ``ref_rejected_logps``), and the metrics
    TRL logged for the step (``logs``): the independent side of the TRL-equality tests.
    """
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from focalpo_mini.tiny import make_model

    class KeepLogs(TrainerCallback):
        def __init__(self):
            self.logs = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs))

    def run(dataset, *, beta=0.1, **overrides):
        config = DPOConfig(
            **overrides,
            output_dir=str(tmp_path_factory.mktemp("dpo")),
            beta=beta,
            bf16=False,
            activation_checkpointing=False,  # transformers 5 name of gradient_checkpointing
            report_to=[],
            max_steps=1,
            logging_steps=1,
            learning_rate=1e-7,
            per_device_train_batch_size=len(dataset),
            use_cpu=True,
            save_strategy="no",
            disable_tqdm=True,
        )
        keep_logs = KeepLogs()
        trainer = DPOTrainer(
            model=make_model(tokenizer, seed=0),
            ref_model=make_model(tokenizer, seed=1),
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[keep_logs],
        )
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(dataset))])
        # TRL's own log-prob code, on the policy and on the reference, before the step.
        policy = trainer.compute_ref_log_probs(trainer.model, batch)
        ref = trainer.compute_ref_log_probs(trainer.ref_model, batch)
        with torch.no_grad():  # TRL's own loss of the batch, unrounded (the logs round it)
            loss = trainer.compute_loss(trainer.model, batch).item()
        trainer.train()
        return {
            "batch": batch,
            "policy_chosen_logps": policy[0],
            "policy_rejected_logps": policy[1],
            "ref_chosen_logps": ref[0],
            "ref_rejected_logps": ref[1],
            "loss": loss,
            "logs": keep_logs.logs[0],
        }

    return run


def pytest_terminal_summary(terminalreporter):
    """How many calls the property suites made under the contract (tests/_contract.py), by
    outcome: returned and checked, or refused with an error naming the argument."""
    import sys

    contract = sys.modules.get("_contract")
    if contract is not None and contract.TALLY:
        tally = dict(contract.TALLY)
        terminalreporter.write_line(f"contract calls: {sum(tally.values())} {tally}")
