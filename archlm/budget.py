"""Runs that end on a wall-clock budget: `--max_train_seconds N`.

A budgeted run does not know its number of steps when it starts. It trains, measures its own pace (wall-clock
seconds per optimizer step, logging and checkpoint saves included, and the seconds of an evaluation), and plans
the largest number of steps whose training, evaluations and final save fit in the budget. The learning-rate
schedule (`--lr_scheduler_type`, with its warm-up) is laid over the planned steps, so it completes when the run
ends: the schedule's function is asked for each step's learning rate with the planned total of that moment.

The plan is made after the first step and refined while the pace settles: at every step of the first
WARMUP_STEPS, every tenth of the run up to its half, and after an evaluation in that half (and after the first
one, whenever it comes: until then its cost is estimated). Otherwise the end of the schedule no longer moves later
in the second half (which would raise the learning rate again), but every hundredth of the run it moves earlier if
the run has fallen behind, so that the schedule still completes on the last step (a decaying rate steps down a
little). The safety
net: a run still late stops as soon as the rest would not fit (the first step's plan alone does not end a run: its
pace includes the warm-up). A resumed run keeps the plan its checkpoint holds.
"""

import functools
import math
import time

import torch
from transformers import TrainerCallback
from transformers.optimization import get_scheduler

WARMUP_STEPS = 10  # steps re-planned one by one while the first steps' pace (warm-up, caches) settles
REPLAN_UNTIL = 0.5  # re-plan every tenth of the run until this fraction of it
SAFETY = 0.02  # of the budget kept free for what is not measured (the process's exit, a slower step at the end)
PROVISIONAL_STEPS = 10**9  # the Trainer needs a positive max_steps before the plan exists
# Schedules whose learning rate is a function of (step, total): they can be laid over steps planned while running
BUDGET_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                     "inverse_sqrt", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay")


def agree(value: float, op: str) -> float:
    """The MIN or MAX of `value` over the processes of a distributed run (itself in a single process): every
    process measures its own pace, and all of them must stop at the same step or the last collective hangs."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.MAX)
    return tensor.item()


def plan_steps(budget: float, elapsed: float, done: int, step_seconds: float, eval_seconds: float,
               eval_every: int | None, final_eval: bool, reserve: float) -> int:
    """The largest total number of steps N >= done whose remaining steps, the evaluations every `eval_every` steps
    between `done` and N, a final evaluation (if `final_eval`) and `reserve` seconds (the final save) still fit in
    `budget` seconds, `elapsed` of which are spent."""
    def cost(total: int) -> float:
        evals = (total // eval_every - done // eval_every) if eval_every else 0
        return (elapsed + (total - done) * step_seconds + (evals + final_eval) * eval_seconds + reserve)

    if cost(done) > budget:
        return done
    low, high = done, done + max(1, math.ceil((budget - elapsed) / max(step_seconds, 1e-9)))
    while low < high:  # cost grows with the total: the last total that fits
        middle = (low + high + 1) // 2
        low, high = (middle, high) if cost(middle) <= budget else (low, middle - 1)
    return low


class TimeBudget(TrainerCallback):
    """Plans a run's steps to fit `seconds` of wall-clock time, from the first training step to the end of the final
    evaluation and save (the setup before it, data and tokenizer, is not counted), and stops it there.

    `eval_tokens` (tokens of one evaluation) estimates the first evaluation's cost before one has been measured,
    `final_eval` says whether the run ends with one, `reserve` is the seconds kept for the final save. A run resumed
    from a checkpoint passes `planned_steps`, the total its plan had reached: it is kept.
    """

    def __init__(self, seconds: float, tokens_per_step: int, eval_tokens: int = 0, final_eval: bool = False,
                 reserve: float = 0.0, planned_steps: int | None = None):
        self.seconds, self.tokens_per_step, self.eval_tokens = seconds, tokens_per_step, eval_tokens
        self.final_eval, self.reserve = final_eval, reserve
        self.planned_steps = planned_steps
        self.fixed = planned_steps is not None
        self.start = self.first_step_end = None
        self.first_step_seconds = None
        self.eval_seconds = None  # of the latest evaluation
        self.eval_total = 0.0  # seconds spent evaluating after the first step
        self.progress_callbacks = []  # the Trainer's ProgressCallbacks: their bar's total follows the plan
        self._next_replan = 0

    # The record of the plan in training_log.json
    def record(self, state=None) -> dict:
        record = {"max_train_seconds": self.seconds, "planned_steps": self.planned_steps}
        if state is not None and self.start is not None:
            record.update(done_steps=state.global_step, elapsed_seconds=round(time.perf_counter() - self.start, 2))
        return record

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()
        if self.fixed:
            state.max_steps = self.planned_steps

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        seconds = (metrics or {}).get("eval_runtime")
        if seconds is not None:
            first = self.eval_seconds is None
            self.eval_seconds = seconds
            self.eval_total += seconds
            if first or self._next_replan != math.inf:  # the first measured cost, or in the first half: plan again
                self._next_replan = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        self.step_ended(args, state, control, time.perf_counter())

    def step_ended(self, args, state, control, now: float) -> None:
        step = state.global_step
        if self.first_step_end is None:
            self.first_step_end, self.first_step_seconds = now, now - self.start
            self.eval_total = 0.0
        if not self.fixed and (step <= WARMUP_STEPS or step >= self._next_replan):
            self.replan(args, state, now)
        elif not self.fixed and self.planned_steps and step % max(1, self.planned_steps // 100) == 0:
            self.replan(args, state, now, later=False)
        self.stop_if_over(args, state, control, now)

    def pace(self, step: int, now: float) -> float:
        """Wall-clock seconds per step since the first (which also pays for warm-up and any compilation)."""
        if step <= 1:
            return self.first_step_seconds
        return max(now - self.first_step_end - self.eval_total, 1e-9) / (step - 1)

    def eval_cost(self, step_seconds: float) -> float:
        """Seconds of one evaluation: the latest measured, else estimated from the training pace (a forward pass
        costs about a third of a training step's forward and backward, token for token)."""
        if self.eval_seconds is not None:
            return self.eval_seconds
        return step_seconds * self.eval_tokens / max(self.tokens_per_step, 1) / 3

    def replan(self, args, state, now: float, later: bool = True) -> None:
        """Plans the run's total steps from its pace so far; with `later=False` only an earlier end is taken."""
        step_seconds = self.pace(state.global_step, now)
        eval_every = state.eval_steps if args.eval_strategy == "steps" and state.eval_steps else None
        total = int(agree(plan_steps(self.seconds * (1 - SAFETY), now - self.start, state.global_step, step_seconds,
                                     self.eval_cost(step_seconds), eval_every, self.final_eval, self.reserve), "min"))
        if state.global_step == 1:
            # a plan made on the first step's pace alone (warm-up, compilation) does not end the run (one came out at
            # 1 step, a third of the budget used): the safety net does, if the next step and the end truly do not fit
            total = max(total, 2)
        if not later:
            if total >= self.planned_steps:
                return
            total = max(total, state.global_step)
        self.planned_steps = state.max_steps = total
        if total * REPLAN_UNTIL <= state.global_step:
            self._next_replan = math.inf
        else:
            self._next_replan = state.global_step + max(1, total // 10)
        for callback in self.progress_callbacks:
            if getattr(callback, "training_bar", None) is not None:
                callback.training_bar.total = total
                callback.training_bar.refresh()

    def stop_if_over(self, args, state, control, now: float) -> None:
        """At the planned step, or as soon as one more step and the end of the run would pass the budget (not in a
        resumed run, which keeps its checkpoint's plan: this process has not seen the time spent before it)."""
        step_seconds = self.pace(state.global_step, now)
        # an evaluation not yet measured is estimated from the pace, once it is more than the first step's
        eval_seconds = self.eval_cost(step_seconds) if self.eval_seconds is not None or state.global_step > 1 else 0.0
        late = not self.fixed and bool(agree(float(now - self.start + step_seconds + self.reserve
                                                   + eval_seconds * self.final_eval > self.seconds), "max"))
        if state.global_step >= state.max_steps or late:
            self.planned_steps = state.max_steps = state.global_step
            # what DefaultFlowCallback does at the last step, which it has already passed for this one
            control.should_training_stop = True
            if args.save_strategy == "steps":
                control.should_save = True
            if args.eval_strategy == "steps" and state.global_step % state.eval_steps != 0:
                control.should_evaluate = True


def check_schedule(args) -> str:
    """The name of --lr_scheduler_type, refused unless the schedule is a function of (step, total steps)."""
    name = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    if name not in BUDGET_SCHEDULERS:
        raise ValueError(f"--lr_scheduler_type {name} cannot be laid over steps planned while training; with "
                         f"--max_train_seconds use one of {', '.join(BUDGET_SCHEDULERS)}.")
    return name


def planned_schedule(args, budget: TimeBudget):
    """A transformers schedule (`--lr_scheduler_type`, its warm-up and kwargs) as a function of the step alone,
    laid over the steps the budget has planned at the moment it is asked. A function, not an object: LambdaLR
    saves an object's attributes into checkpoints, and the plan belongs to the trainer state, not there."""
    name = check_schedule(args)

    @functools.lru_cache(maxsize=4)
    def for_total(total: int):
        """The schedule's lr_lambda for `total` steps (built on a stand-in optimizer: it is a pure function)."""
        stand_in = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=args.learning_rate)
        scheduler = get_scheduler(name, stand_in, args.get_warmup_steps(total), total,
                                  scheduler_specific_kwargs=args.lr_scheduler_kwargs)
        return scheduler.lr_lambdas[0]

    def lr_lambda(step: int) -> float:
        return for_total(max(budget.planned_steps or PROVISIONAL_STEPS, 1))(step)

    return lr_lambda
