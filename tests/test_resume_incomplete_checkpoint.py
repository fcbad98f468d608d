"""What a disconnect leaves behind, and what the next session makes of it (smoke mode, CPU).

- A checkpoint with any one of its files missing (a save cut off, a cloud drive that had not
  uploaded everything) is skipped with a message naming it; the run resumes from the previous
  complete checkpoint and ends where an uninterrupted run ends.
- A folder records the run's plan: a call with other settings is refused, naming the
  difference; a finished run returns at once; the session budget ends a session cleanly and
  the next one continues the same run.
"""

import dataclasses
import json
import shutil

import pytest
import torch
from transformers import TrainerCallback

from focalpo_mini import recipes
from focalpo_mini.recipes import (
    COMPLETE_MARKER,
    SMOKE_OVERRIDES,
    ProgressReport,
    RunSettings,
    build_trainer,
    checkpoints,
    load_model_and_tokenizer,
    load_preference_data,
    train,
)


def _trainer(output_dir, **changes):
    settings = RunSettings(smoke=True, output_dir=str(output_dir), **changes).resolved()
    model, tokenizer = load_model_and_tokenizer(settings)
    return build_trainer(settings, model, tokenizer, load_preference_data(settings))


def _losses(trainer):
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


def _assert_same_run(trainer, reference):
    assert trainer.state.global_step == reference.state.global_step
    assert _losses(trainer) == pytest.approx(_losses(reference), rel=1e-5)
    for (name, a), (_, b) in zip(
        trainer.model.named_parameters(), reference.model.named_parameters(), strict=True
    ):
        if a.requires_grad:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """(an uninterrupted 4-step smoke run, its folder): checkpoints at steps 2 and 4."""
    assert SMOKE_OVERRIDES["save_steps"] == 2 and SMOKE_OVERRIDES["max_steps"] == 4
    folder = tmp_path_factory.mktemp("finished")
    trainer = _trainer(folder)
    train(trainer)
    return trainer, folder


def test_every_checkpoint_is_marked_complete_with_its_files(finished):
    _, folder = finished
    assert [p.name for p in checkpoints(folder)] == ["checkpoint-2", "checkpoint-4"]
    for checkpoint in checkpoints(folder):
        listed = json.loads((checkpoint / COMPLETE_MARKER).read_text())["files"]
        on_disk = {
            str(p.relative_to(checkpoint)): p.stat().st_size
            for p in checkpoint.rglob("*")
            if p.is_file() and p.name != COMPLETE_MARKER
        }
        assert listed == on_disk
        assert {"optimizer.pt", "trainer_state.json", "adapter_model.safetensors"} <= set(listed)
        assert recipes.incomplete_reason(checkpoint) is None


def test_a_missing_file_in_the_newest_checkpoint_falls_back_to_the_previous_one(
    finished, tmp_path, capsys, one_thread
):
    """Each file of checkpoint-4 removed in turn, the marker included: the run resumes at step 2
    (steps 3 and 4 run again) and ends equal to the uninterrupted run."""
    reference, folder = finished
    names = sorted(p.name for p in (folder / "checkpoint-4").iterdir())
    assert COMPLETE_MARKER in names and len(names) >= 8
    for name in names:
        copy = tmp_path / name
        shutil.copytree(folder, copy)
        (copy / "checkpoint-4" / name).unlink()
        capsys.readouterr()
        again = _trainer(copy)
        train(again)
        out = capsys.readouterr().out
        assert "skipping checkpoint-4: incomplete" in out, name
        assert "resuming from checkpoint-2" in out, name
        _assert_same_run(again, reference)
        assert not (copy / "checkpoint-4" / name).exists() or (
            recipes.incomplete_reason(copy / "checkpoint-4") is None
        )


def test_a_truncated_file_is_incomplete_too(finished, tmp_path):
    _, folder = finished
    copy = tmp_path / "run"
    shutil.copytree(folder, copy)
    optimizer = copy / "checkpoint-4" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    assert "optimizer.pt has 100 bytes" in recipes.incomplete_reason(copy / "checkpoint-4")
    assert recipes.last_complete_checkpoint(copy).name == "checkpoint-2"


def test_a_finished_run_returns_at_once_with_its_weights(finished, tmp_path, capsys):
    reference, folder = finished
    copy = tmp_path / "run"
    shutil.copytree(folder, copy)
    steps = []

    class Steps(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            steps.append(state.global_step)

    again = _trainer(copy)
    again.add_callback(Steps())
    result = train(again)
    assert steps == []  # no step 5 of 4
    assert "the run finished at step 4" in capsys.readouterr().out
    assert result.global_step == 4 and result.metrics["already_finished"]
    _assert_same_run(again, reference)


def test_other_settings_on_the_same_folder_are_refused(finished, tmp_path):
    _, folder = finished
    copy = tmp_path / "run"
    shutil.copytree(folder, copy)
    with pytest.raises(ValueError, match=r"gamma 0\.5 \(this call: 2\.0\)") as caught:
        load_model_and_tokenizer(RunSettings(smoke=True, output_dir=str(copy), gamma=2.0))
    assert "another output_dir" in str(caught.value)
    with pytest.raises(ValueError, match="recipe 'qlora'"):
        load_preference_data(RunSettings(smoke=True, recipe="full", output_dir=str(copy)))
    # What does not change the computation may change: more checkpoints kept.
    same = RunSettings(smoke=True, output_dir=str(copy), save_total_limit=3)
    assert recipes.check_run_plan(same)["gamma"] == 0.5


def test_smoke_data_is_never_rewritten_under_a_live_dataset(tmp_path):
    first = load_preference_data(RunSettings(smoke=True, output_dir=str(tmp_path)))
    row = first[0]
    load_preference_data(RunSettings(smoke=True, output_dir=str(tmp_path), seed=7))
    assert first[0] == row


def test_a_session_budget_saves_stops_and_the_next_session_continues(
    finished, tmp_path, capsys, one_thread
):
    """A budget smaller than one step: every session runs one step, saves it, stops, and says
    how many sessions are left; four sessions make the uninterrupted run."""
    reference, _ = finished
    printed = []
    for session in range(1, 5):
        trainer = _trainer(tmp_path)
        report = ProgressReport(print_fn=printed.append, budget_hours=1e-9, reserve_seconds=0.0)
        trainer.add_callback(report)
        train(trainer)
        assert trainer.state.global_step == session
        assert (tmp_path / f"checkpoint-{session}").is_dir()
        if session < 4:
            assert report.stopped_for_budget
            assert printed[-1].startswith(f"session ends at step {session}/4: {4 - session} steps")
            assert f"{4 - session} more session(s)" in printed[-1]
    assert printed[-1] == "the run is complete: step 4/4"
    _assert_same_run(trainer, reference)


def test_settings_and_plan_round_trip_through_json(tmp_path):
    import numpy as np

    settings = RunSettings(smoke=True, output_dir=str(tmp_path), gamma=np.float32(0.25))
    plan = recipes.record_run_plan(settings)
    assert json.loads((tmp_path / recipes.PLAN_FILE).read_text()) == plan
    assert plan["gamma"] == 0.25 and type(plan["gamma"]) is float
    assert recipes.check_run_plan(dataclasses.replace(settings, gamma=0.25)) == plan


def test_flush_runs_before_and_after_each_marker(tmp_path, one_thread):
    """On Colab ``flush`` uploads Drive's pending writes: once before the marker (so the files
    it lists reach Drive first), once after it."""
    seen = []

    def flush():
        newest = checkpoints(tmp_path)[-1]
        seen.append((newest.name, (newest / COMPLETE_MARKER).is_file()))

    settings = RunSettings(smoke=True, output_dir=str(tmp_path)).resolved()
    model, tokenizer = load_model_and_tokenizer(settings)
    trainer = build_trainer(settings, model, tokenizer, load_preference_data(settings), flush=flush)
    train(trainer)
    assert seen == [
        ("checkpoint-2", False),
        ("checkpoint-2", True),
        ("checkpoint-4", False),
        ("checkpoint-4", True),
    ]
    with pytest.raises(TypeError, match="flush"):
        recipes.CompleteCheckpoints(flush="drive")
