"""Training recipes: named sets of flags, measured to learn the most per second (docs/training.md has the table).

`--recipe speedrun` prepends its flags to the command line, so every flag the user gives explicitly wins over it
(the last flag wins). training_log.json records what the recipe chose and what the user kept.

A recipe may also fit its dropout to the data (`dropout_per_epoch`): small data read many times over is overfit
without dropout, and a run that reads its data about once only loses by it (docs/training.md). The rate follows the
epochs the run will make, known from --max_steps or from the plan of --max_train_seconds (`RepeatDropout`).
"""

import torch
from transformers import TrainerCallback

from .configuration_archlm import parse_config_overrides

DROPOUT_FIELDS = ("hidden_dropout", "attention_dropout", "embedding_dropout")

RECIPES = {
    "speedrun": {
        "description": "from-scratch training of a small model on small data within a wall-clock budget",
        # Muon (0.83x AdamW's loss per character at 240 s), its learning rate from a scan (4e-3 -> 8e-3: 1.642 ->
        # 1.622), a warm-up of a fifth of the run (a long warm-up won: 1.617 vs 1.634 at 20 steps), weight decay
        # 0.1 (neutral on one epoch, part of the fix on many)
        "flags": {"optim": "muon", "learning_rate": 8e-3, "lr_scheduler_type": "cosine", "warmup_steps": 0.2,
                  "weight_decay": 0.1},
        # dropout = min(max, per_epoch x (epochs - 1)) on every dropout field the user leaves unset: at 7 epochs
        # 0.1 turned 1.755 nats/char (overfit) into 1.578 and 0.2 into 1.569; at 1.5 epochs 0.1 cost 3%
        "dropout_per_epoch": 0.03,
        "max_dropout": 0.2,
    },
}


def flag_names(argv: list[str]) -> set[str]:
    """The flags given on a command line, without their dashes: --a 1 --b=2 -> {"a", "b"}."""
    return {token[2:].split("=", 1)[0] for token in argv if token.startswith("--")}


def flag_value(argv: list[str], name: str) -> str | None:
    """The value of the last `--name VALUE` or `--name=VALUE` (argparse's rule: the last wins)."""
    value = None
    for index, token in enumerate(argv):
        if token == f"--{name}" and index + 1 < len(argv):
            value = argv[index + 1]
        elif token.startswith(f"--{name}="):
            value = token.split("=", 1)[1]
    return value


def apply_recipe(argv: list[str]) -> tuple[list[str], dict | None]:
    """argv with the flags of its --recipe put before it, and the record of what the recipe chose."""
    name = flag_value(argv, "recipe")
    if name is None:
        return argv, None
    if name not in RECIPES:
        raise ValueError(f"--recipe {name!r} is unknown; recipes: {', '.join(RECIPES)}.")
    if flag_value(argv, "model_name_or_path") is not None:
        raise ValueError(f"--recipe {name} is a recipe for training from scratch; fine-tuning (--model_name_or_path) "
                         "wants a smaller learning rate and no warm-up to speak of: give its flags yourself.")
    recipe, given = RECIPES[name], flag_names(argv)
    flags = {flag: value for flag, value in recipe["flags"].items() if flag not in given}
    user_overrides = flag_value(argv, "config_overrides")
    user_config = parse_config_overrides(user_overrides) if user_overrides else {}
    prefix = [token for flag, value in flags.items() for token in (f"--{flag}", str(value))]
    fitted = [field for field in DROPOUT_FIELDS if field not in user_config] if recipe["dropout_per_epoch"] else []
    record = {
        "name": name,
        "description": recipe["description"],
        "chose": flags,
        "kept_from_user": sorted((set(recipe["flags"]) & given)
                                 | (set(DROPOUT_FIELDS) & set(user_config) if recipe["dropout_per_epoch"] else set())),
    }
    if fitted:
        record["dropout"] = {"per_epoch": recipe["dropout_per_epoch"], "max": recipe["max_dropout"], "fields": fitted}
    return prefix + argv, record


class RepeatDropout(TrainerCallback):
    """Sets the model's dropout from the number of epochs the run will make: min(`maximum`, `per_epoch` x
    (epochs - 1)), on the config `fields` given (the others are the user's). Applied at the start of training, and
    again whenever the planned number of steps changes (a --max_train_seconds plan is refined while training).
    The model's config is updated too, so the saved config.json says what was trained with."""

    def __init__(self, model: torch.nn.Module, train_blocks: int, rows_per_step: int, per_epoch: float,
                 maximum: float, fields: tuple[str, ...] = DROPOUT_FIELDS):
        self.model, self.train_blocks, self.rows_per_step = model, train_blocks, rows_per_step
        self.per_epoch, self.maximum, self.fields = per_epoch, maximum, fields
        self.planned_for = None
        self.rate = 0.0
        self.epochs = None

    def record(self) -> dict:
        return {"dropout": self.rate, "epochs": None if self.epochs is None else round(self.epochs, 2),
                "fields": list(self.fields)}

    def apply(self, steps: int) -> None:
        self.planned_for, self.epochs = steps, steps * self.rows_per_step / self.train_blocks
        self.rate = round(min(self.maximum, self.per_epoch * max(0.0, self.epochs - 1)), 3)
        for parent, name in self._dropout_slots():
            getattr(parent, name).p = self.rate
        if "attention_dropout" in self.fields:
            for module in self.model.modules():
                if hasattr(module, "attention_dropout") and hasattr(module, "q_proj"):  # ArchLMAttention
                    module.attention_dropout = self.rate
        config = getattr(self.model, "config", None)
        for field in self.fields:
            if config is not None:
                setattr(config, field, self.rate)

    def _dropout_slots(self):
        """(module, attribute) of the dropouts a field governs: `dropout` of decoder layers (hidden_dropout),
        `embed_dropout` of the model (embedding_dropout)."""
        names = {"hidden_dropout": "dropout", "embedding_dropout": "embed_dropout"}
        wanted = {names[field] for field in self.fields if field in names}
        return [(module, name) for module in self.model.modules() for name in wanted
                if isinstance(getattr(module, name, None), torch.nn.Dropout)]

    def on_train_begin(self, args, state, control, **kwargs):
        self._maybe_apply(state)

    def on_step_end(self, args, state, control, **kwargs):
        self._maybe_apply(state)

    def _maybe_apply(self, state) -> None:
        from .budget import PROVISIONAL_STEPS

        if 0 < state.max_steps < PROVISIONAL_STEPS and state.max_steps != self.planned_for:
            self.apply(state.max_steps)
