"""archlm/recipes.py and `--recipe speedrun`: a recipe's flags go before the user's, so every explicit flag wins;
its dropout follows the epochs the run makes, on the dropout fields the user leaves unset; training_log.json and
config.json record the choice."""

import json

import pytest
import torch
from conftest import TINY_MODEL

import archlm.train
from archlm import ArchLMConfig, ArchLMForCausalLM
from archlm.recipes import DROPOUT_FIELDS, RECIPES, RepeatDropout, apply_recipe, flag_value
from train_helpers import read_log, train

SPEEDRUN = RECIPES["speedrun"]


def test_speedrun_sets_its_flags_when_the_user_gives_none():
    argv, record = apply_recipe(["--recipe", "speedrun", "--output_dir", "x"])
    for flag, value in SPEEDRUN["flags"].items():
        assert flag_value(argv, flag) == str(value)
    assert record["name"] == "speedrun" and record["kept_from_user"] == [] and record["chose"] == SPEEDRUN["flags"]
    assert record["dropout"]["fields"] == list(DROPOUT_FIELDS)
    _, _, _, training_args = archlm.train.parse_args(argv)
    assert training_args.optim == "muon" and training_args.learning_rate == SPEEDRUN["flags"]["learning_rate"]


def test_every_explicit_flag_and_dropout_field_wins_over_the_recipe():
    user = ["--recipe", "speedrun", "--learning_rate", "5e-4", "--config_overrides", "hidden_size=64,hidden_dropout=0.0",
            "--output_dir", "x"]
    model_args, _, run_args, training_args = archlm.train.parse_args(user)
    assert training_args.learning_rate == 5e-4 and training_args.optim == "muon"
    assert model_args.config_overrides == "hidden_size=64,hidden_dropout=0.0"
    record = run_args.recipe_record
    assert record["kept_from_user"] == ["hidden_dropout", "learning_rate"]
    assert "learning_rate" not in record["chose"]
    assert record["dropout"]["fields"] == ["attention_dropout", "embedding_dropout"]


def test_a_recipe_for_training_from_scratch_is_refused_for_fine_tuning_and_unknown_names_are_listed(capsys):
    with pytest.raises(SystemExit):
        archlm.train.parse_args(["--recipe", "speedrun", "--model_name_or_path", "some/folder"])
    assert "--recipe speedrun is a recipe for training from scratch" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        archlm.train.parse_args(["--recipe", "fastest"])
    assert "--recipe 'fastest' is unknown; recipes: speedrun" in capsys.readouterr().err


def tiny_model() -> ArchLMForCausalLM:
    return ArchLMForCausalLM(ArchLMConfig.from_preset("llama", vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                      num_attention_heads=2, num_key_value_heads=1,
                                                      intermediate_size=64))


@pytest.mark.parametrize("steps, rate", [(10, 0.0), (20, 0.0), (60, 0.06), (1000, 0.2)])
def test_dropout_grows_with_the_epochs_and_stops_at_its_maximum(steps, rate):
    model = tiny_model()
    # 40 blocks, 2 blocks a step: 20 steps are one epoch
    dropout = RepeatDropout(model, train_blocks=40, rows_per_step=2, per_epoch=0.03, maximum=0.2)
    dropout.apply(steps)
    assert dropout.rate == pytest.approx(rate)
    assert [module.p for module in model.modules() if isinstance(module, torch.nn.Dropout)] == [rate] * 3
    assert {layer.self_attn.attention_dropout for layer in model.model.layers} == {rate}
    assert all(getattr(model.config, field) == rate for field in DROPOUT_FIELDS)


def test_dropout_leaves_the_fields_the_user_set():
    model = tiny_model()
    RepeatDropout(model, 40, 2, 0.03, 0.2, fields=("attention_dropout",)).apply(1000)
    assert model.config.attention_dropout == 0.2 and model.config.hidden_dropout == 0.0
    assert [module.p for module in model.modules() if isinstance(module, torch.nn.Dropout)] == [0.0] * 3


def test_a_run_with_the_recipe_records_what_it_chose_and_trains_with_the_fitted_dropout(tmp_path):
    output = train("--config_overrides", TINY_MODEL, "--recipe", "speedrun", "--max_steps", "40",
                   "--output_dir", str(tmp_path / "run"))
    log = read_log(output)
    recipe = log["recipe"]
    assert recipe["name"] == "speedrun" and "learning_rate" in recipe["kept_from_user"]  # TINY gives one
    epochs = 40 * 4 / log["train_blocks"]  # TINY: 4 blocks a step
    assert recipe["dropout"]["epochs"] == pytest.approx(epochs, abs=0.01)
    assert recipe["dropout"]["dropout"] == pytest.approx(min(0.2, round(0.03 * max(0.0, epochs - 1), 3)))
    saved = json.loads((output / "config.json").read_text())
    assert all(saved[field] == recipe["dropout"]["dropout"] for field in DROPOUT_FIELDS)
    assert log["config"]["hidden_size"] == 32  # the user's architecture is untouched


def test_a_recipe_run_resumes_with_its_own_command_and_its_dropout(tmp_path):
    """The checkpoints' configs hold the dropout the recipe fitted; the flags build the model without it (the recipe
    sets it when training starts), so the resume check leaves those fields to the recipe."""
    from transformers import TrainerCallback

    class InterruptAtStep6(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 6:
                raise KeyboardInterrupt

    flags = ["--config_overrides", TINY_MODEL, "--recipe", "speedrun", "--max_steps", "40", "--save_steps", "5",
             "--max_train_samples", "8",
             "--output_dir", str(tmp_path / "run")]
    with pytest.raises(KeyboardInterrupt):
        train(*flags, callbacks=[InterruptAtStep6()])
    saved = json.loads((tmp_path / "run" / "checkpoint-5" / "config.json").read_text())
    assert saved["hidden_dropout"] > 0  # what made the resume check refuse the run's own flags
    output = train(*flags, "--resume_from_checkpoint", "latest")
    log = read_log(output)
    assert log["status"] == "finished" and log["summary"]["global_step"] == 40
    assert json.loads((output / "config.json").read_text())["hidden_dropout"] == saved["hidden_dropout"]
