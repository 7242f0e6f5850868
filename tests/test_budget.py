"""archlm/budget.py and `--max_train_seconds`: runs that plan their steps to end on a wall-clock budget.

The planning rule is checked with numbers; a budgeted run is checked for what it records and for a schedule that
completes on its last step (never for how long it took: no timed assertions here); a resumed budgeted run keeps
its plan; flags that cannot work with a budget are refused before anything is written.
"""

import json
import shutil

import pytest
from conftest import TINY_MODEL

from archlm.budget import PROVISIONAL_STEPS, SAFETY, TimeBudget, plan_steps, planned_schedule
from archlm.training import ArchLMTrainingArguments
from train_helpers import TINY, read_log, train, train_script


def test_plan_fits_steps_evaluations_and_the_final_save_in_the_budget():
    # 100 s, 10 spent at step 5, 0.5 s a step, no evaluations, 2 s to save: (100 - 10 - 2) / 0.5 = 176 more steps
    assert plan_steps(100, 10, 5, 0.5, 0, None, False, 2) == 5 + 176
    # evaluations of 4 s every 50 steps and a final one
    total = plan_steps(100, 10, 5, 0.5, 4, 50, True, 2)
    evals = total // 50 + 1
    assert 10 + (total - 5) * 0.5 + evals * 4 + 2 <= 100 < 10 + (total + 1 - 5) * 0.5 + ((total + 1) // 50 + 1) * 4 + 2
    # over budget already: stop where it is
    assert plan_steps(100, 99, 40, 0.5, 0, None, True, 2) == 40


def budget_args(tmp_path):
    return ArchLMTrainingArguments(output_dir=str(tmp_path), learning_rate=1.0, lr_scheduler_type="cosine",
                                   warmup_steps=0.1, max_steps=PROVISIONAL_STEPS)


def test_the_schedule_follows_the_plan_and_its_warmup_ratio(tmp_path):
    budget = TimeBudget(60, tokens_per_step=1024)
    schedule = planned_schedule(budget_args(tmp_path), budget)
    assert schedule(0) == 0.0 and schedule(1000) < 1e-4  # no plan yet: the warm-up of a very long run
    budget.planned_steps = 100
    assert schedule(5) == pytest.approx(0.5)  # warm-up is 10% of the planned 100 steps
    assert schedule(10) == pytest.approx(1.0)
    assert schedule(55) == pytest.approx(0.5)  # cosine half-way
    assert schedule(100) == pytest.approx(0.0)
    budget.planned_steps = 200  # a new plan lays the same schedule over more steps
    assert schedule(110) == pytest.approx(0.5)


def test_a_run_that_falls_behind_ends_its_schedule_earlier_on_its_last_step_and_never_later(tmp_path):
    """Steps of 1 s, then 1.5 s from step 56 (after the plan holds): the plan made at the start (98 steps in 100 s)
    no longer fits. Held, the run stopped late at step 85 with the cosine still at 5% of its peak; the plan instead
    moves its end earlier, step by step, so the run stops on its planned step with the schedule at zero."""
    from transformers import TrainerControl, TrainerState

    args = budget_args(tmp_path)
    budget = TimeBudget(100, tokens_per_step=1024)
    schedule = planned_schedule(args, budget)
    state, control = TrainerState(max_steps=PROVISIONAL_STEPS), TrainerControl()
    budget.start, now, plans, rates = 0.0, 0.0, [], [0.0]
    while not control.should_training_stop:
        state.global_step += 1
        now += 1.0 if state.global_step <= 55 else 1.5
        # the Trainer steps the scheduler after the optimizer, before the callbacks: the next step's rate
        rates.append(schedule(state.global_step))
        budget.step_ended(args, state, control, now)
        plans.append(budget.planned_steps)
    assert plans[0] == 98 and plans[len(plans) // 2] > state.global_step  # the first half's plan was not met
    assert all(later <= earlier for earlier, later in zip(plans[len(plans) // 2:], plans[len(plans) // 2 + 1:]))
    assert budget.planned_steps == state.max_steps == state.global_step and now <= 100
    # step s trained at rates[s - 1] (rates[0]: the warm-up's start): the last one near zero, the cosine completed
    assert max(rates) == pytest.approx(1.0) and rates[state.global_step - 1] < 0.01


@pytest.mark.parametrize("step_seconds, eval_steps, budget_seconds", [(3.0, 15, 30), (5.0, 12, 60), (1.0, 30, 40)])
def test_a_run_with_a_costly_final_evaluation_ends_within_its_budget(tmp_path, step_seconds, eval_steps, budget_seconds):
    """The final evaluation (eval_steps training steps' tokens, taking what the estimate says) must fit too: the
    safety net counts its estimate from the second step on (a review found 30 s runs ending at 45 s)."""
    from transformers import TrainerControl, TrainerState

    args = budget_args(tmp_path)
    budget = TimeBudget(budget_seconds, tokens_per_step=1024, eval_tokens=eval_steps * 1024, final_eval=True)
    state, control = TrainerState(max_steps=PROVISIONAL_STEPS), TrainerControl()
    budget.start, now = 0.0, 0.0
    while not control.should_training_stop:
        state.global_step += 1
        now += step_seconds
        budget.step_ended(args, state, control, now)
    assert state.global_step >= 2 and now + eval_steps * step_seconds / 3 <= budget_seconds


def test_a_plan_made_on_the_warm_up_pace_does_not_end_the_run_the_safety_net_does(tmp_path):
    """A first step of 6 s (warm-up), then 0.5 s steps, in 30 s with a final evaluation of 12 training steps'
    tokens (estimated at a third of their cost until measured). On the first step's pace the plan fits no second
    step: it ended the run there, with a fifth of the budget used. Now the run goes on, re-planned at each warm-up
    step on a settling pace, and ends within the budget: one more step would not have fit."""
    from transformers import TrainerControl, TrainerState

    args = budget_args(tmp_path)
    budget = TimeBudget(30, tokens_per_step=1024, eval_tokens=12 * 1024, final_eval=True, reserve=1.0)
    state, control = TrainerState(max_steps=PROVISIONAL_STEPS), TrainerControl()
    budget.start, now = 0.0, 0.0
    while not control.should_training_stop:
        state.global_step += 1
        now += 6.0 if state.global_step == 1 else 0.5
        budget.step_ended(args, state, control, now)
        if state.global_step == 1:
            assert state.max_steps == 2  # the plan alone said 1
    final = now + 12 * 0.5 / 3 + 1.0  # the estimated evaluation, the save
    assert state.global_step > 20 and final <= 30 * (1 - SAFETY) < final + 0.5


BUDGETED = ["--config_overrides", TINY_MODEL, "--max_train_seconds", "6", "--lr_scheduler_type", "cosine",
            "--warmup_steps", "3", "--eval_strategy", "steps", "--eval_steps", "10", "--max_eval_samples", "16"]


def test_a_budgeted_run_records_its_plan_and_its_schedule_ends_on_its_last_step(tmp_path):
    output = train(*BUDGETED, "--output_dir", str(tmp_path / "run"))
    log = read_log(output)
    budget = log["summary"]["budget"]
    assert budget["max_train_seconds"] == 6
    assert budget["planned_steps"] == budget["done_steps"] == log["summary"]["global_step"] == log["planned_steps"]
    assert budget["done_steps"] > 3 and budget["elapsed_seconds"] > 0
    assert log["budget"] == budget and log["status"] == "finished"
    steps = log["steps"]
    assert [entry["step"] for entry in steps] == list(range(1, budget["done_steps"] + 1))
    peak = max(entry["learning_rate"] for entry in steps)
    assert peak == pytest.approx(3e-3)
    # the last logged rate is the schedule's at the planned total: near zero, the cosine completed
    assert steps[-1]["learning_rate"] < 0.05 * peak
    assert log["evals"][-1]["step"] == budget["done_steps"]  # ends with an evaluation of the final weights
    assert (output / "model.safetensors").is_file()


def test_a_resumed_budgeted_run_keeps_the_plan_of_its_checkpoint(tmp_path):
    whole = train(*BUDGETED, "--save_steps", "4", "--output_dir", str(tmp_path / "whole"))
    # the plan at step 4 (refined later in the whole run, which the checkpoint cannot know)
    planned = json.loads((whole / "checkpoint-4" / "trainer_state.json").read_text())["max_steps"]
    assert 4 < planned < PROVISIONAL_STEPS
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(whole / "checkpoint-4", resumed_dir / "checkpoint-4")
    resumed = train(*BUDGETED, "--save_steps", "4", "--output_dir", str(resumed_dir), "--resume_from_checkpoint",
                    "latest")
    log = read_log(resumed)
    assert log["summary"]["global_step"] == log["summary"]["budget"]["planned_steps"] == planned
    steps = log["steps"]
    assert [entry["step"] for entry in steps] == list(range(1, planned + 1))
    assert steps[-1]["learning_rate"] < 0.05 * max(entry["learning_rate"] for entry in steps)


@pytest.mark.parametrize("flags, message", [
    (["--max_train_seconds", "0"], "--max_train_seconds must be a positive number of seconds, got 0"),
    (["--max_train_seconds", "60", "--max_steps", "10"], "plans the number of steps itself: drop --max_steps 10"),
    (["--max_train_seconds", "60", "--lr_scheduler_type", "reduce_lr_on_plateau", "--eval_strategy", "steps"],
     "--lr_scheduler_type reduce_lr_on_plateau cannot be laid over steps planned while training"),
    (["--max_train_seconds", "60", "--eval_strategy", "steps", "--eval_steps", "0.25"],
     "--eval_steps 0.25 is a fraction of the run's steps"),
], ids=["zero", "max-steps", "plateau", "fraction"])
def test_flags_that_cannot_work_with_a_budget_are_refused_before_anything_is_written(tmp_path, flags, message):
    with pytest.raises(SystemExit) as error:
        train_script.main([*TINY, "--config_overrides", TINY_MODEL, *flags, "--output_dir", str(tmp_path / "run")])
    assert message in str(error.value)
    assert not (tmp_path / "run").exists()
