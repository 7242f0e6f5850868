"""examples/generate.py: streams a continuation from a saved folder, prompt from argv or stdin, each cache."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_script, tiny_config

from archlm import ArchLMForCausalLM
from archlm.tokenization_archlm import train_tokenizer

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "generate.py"


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    tokenizer = train_tokenizer(["def add(a, b):\n    return a + b\n" * 40, "for i in range(10):\n    print(i)\n" * 40],
                                vocab_size=300)
    torch.manual_seed(0)
    config = tiny_config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = ArchLMForCausalLM(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    ids = tokenizer("def add(", return_tensors="pt")["input_ids"]
    greedy = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return folder, tokenizer.decode(greedy[0], skip_special_tokens=True)


def run(*args, stdin=None):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], input=stdin, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("cache", ["dynamic", "static", "none"])
def test_greedy_generation_streams_what_generate_gives_for_every_cache(model_folder, cache):
    folder, expected = model_folder
    result = run(folder, "def add(", "--max_new_tokens", 8, "--cache", cache)
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip("\n") == expected
    assert "8 new tokens in " in result.stderr and f"cache={cache}]" in result.stderr


@pytest.mark.slow  # the compilation of the decode step takes ~a minute on 2 CPU cores
def test_compiled_decoding_streams_the_same_greedy_tokens(model_folder):
    folder, expected = model_folder
    result = run(folder, "def add(", "--max_new_tokens", 8, "--compile")
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip("\n") == expected
    assert "cache=static, compiled]" in result.stderr
    refused = run(folder, "def add(", "--compile", "--cache", "none")
    assert refused.returncode != 0 and "--compile decodes with a static cache" in refused.stderr


def test_prompt_from_standard_input_and_seeded_sampling(model_folder):
    model_folder, _ = model_folder
    first = run(model_folder, "--do_sample", "--temperature", 1.5, "--seed", 3, "--max_new_tokens", 10, stdin="for i in")
    second = run(model_folder, "--do_sample", "--temperature", 1.5, "--seed", 3, "--max_new_tokens", 10, stdin="for i in")
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("for i in") and first.stdout == second.stdout


def test_beam_search_prints_the_best_beam(model_folder):
    model_folder, _ = model_folder
    result = run(model_folder, "def", "--num_beams", 3, "--max_new_tokens", 5)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("def")


def test_empty_prompt_is_refused(model_folder):
    model_folder, _ = model_folder
    result = run(model_folder, stdin="")
    assert result.returncode != 0 and "empty prompt" in result.stderr


@pytest.mark.parametrize("flags, named", [(["--max_new_tokens", "0"], "--max_new_tokens 0"),
                                          (["--do_sample", "--temperature", "0"], "--temperature 0.0"),
                                          (["--top_p", "1.5"], "--top_p 1.5")])
def test_out_of_range_flags_are_refused_before_the_model_loads(capsys, flags, named):
    generate_example = load_script(SCRIPT, "generate_example")
    with pytest.raises(SystemExit):
        generate_example.parse_args(["runs/no_such_run", "def ", *flags])
    assert f"{named} is out of range" in capsys.readouterr().err


def test_a_missing_local_folder_is_named_at_once(tmp_path):
    result = run(tmp_path / "no_such_run", "def ")
    assert result.returncode != 0 and f"model folder '{tmp_path / 'no_such_run'}' does not exist" in result.stderr


def test_learned_positions_refuse_a_length_past_their_table_before_generating(tmp_path):
    tokenizer = train_tokenizer(["def add(a, b):\n    return a + b\n" * 40], vocab_size=300)
    config = tiny_config(vocab_size=len(tokenizer), position_embedding_type="learned", max_position_embeddings=32,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    ArchLMForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    prompt_tokens = len(tokenizer("def add(")["input_ids"])
    result = run(tmp_path, "def add(", "--max_new_tokens", "40")
    assert result.returncode != 0 and result.stdout == ""
    assert f"use --max_new_tokens {32 - prompt_tokens} or less" in result.stderr
    assert run(tmp_path, "def add(", "--max_new_tokens", str(32 - prompt_tokens)).returncode == 0
    result = run(tmp_path, "def add(a, b):\n    return a + b\n" * 8, "--max_new_tokens", "1")  # the prompt alone
    assert result.returncode != 0 and "shorten the prompt to fewer than 32 tokens" in result.stderr
