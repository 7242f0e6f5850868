"""archlm.serve: transformers' own OpenAI-compatible server (`transformers serve`) on an ArchLM folder, driven with
the official `openai` client; a native export served by plain `transformers serve`.

Each server runs in a subprocess on a free 127.0.0.1 port, is waited for with a bounded loop on /health, and is
always terminated.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_serve.py -q
"""

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_trained_model
from openai import OpenAI
from transformers import AutoModelForCausalLM, AutoTokenizer

from archlm import serve
from archlm.convert import export_folder

STARTUP_TIMEOUT_S = 180
PROMPT = "def train_tokenizer("
MESSAGES = [{"role": "user", "content": "Write a tokenizer."}]
MAX_TOKENS = 12


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def running_server(command: list[str], log_path: Path, modules_cache: Path):
    """Starts `command` + host/port flags, waits until /health answers (or the process dies, or the time is up), yields
    the base URL, and terminates the server whatever happens."""
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_HUB_DISABLE_UPDATE_CHECK="1",
               HF_MODULES_CACHE=str(modules_cache))
    with open(log_path, "w") as log:
        process = subprocess.Popen([*command, "--host", "127.0.0.1", "--port", str(port)], stdout=log,
                                   stderr=subprocess.STDOUT, env=env, cwd=log_path.parent)
        try:
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while True:
                if process.poll() is not None:
                    pytest.fail(f"the server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
                if time.monotonic() > deadline:
                    pytest.fail(f"the server did not answer /health in {STARTUP_TIMEOUT_S} s:\n"
                                f"{log_path.read_text()[-3000:]}")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                        if response.status == 200:
                            break
                except OSError:  # not listening yet
                    time.sleep(0.5)
            yield f"http://127.0.0.1:{port}/v1"
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=30)


def greedy_continuation(folder: Path, input_ids: list[int]) -> str:
    """What the served model should answer at temperature 0: greedy decoding with generate(), here."""
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    with torch.no_grad():
        output = model.generate(torch.tensor([input_ids]), max_new_tokens=MAX_TOKENS, do_sample=False)
    return tokenizer.decode(output[0, len(input_ids):], skip_special_tokens=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("serve") / "model"
    save_tiny_trained_model(folder)
    return folder


@pytest.fixture(scope="module")
def archlm_server(model_dir, tmp_path_factory):
    """`python -m archlm.serve MODEL_DIR`, MODEL_DIR as the user typed it (relative to the working folder)."""
    command = [sys.executable, "-m", "archlm.serve", model_dir.name]
    with running_server(command, model_dir.parent / "server.log", tmp_path_factory.mktemp("modules")) as base_url:
        yield OpenAI(base_url=base_url, api_key="not-checked", max_retries=0, timeout=120), model_dir.name


def test_completion_is_the_models_greedy_continuation(archlm_server, model_dir):
    client, model_id = archlm_server
    completion = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    assert completion.choices[0].text == greedy_continuation(model_dir, prompt_ids)
    assert completion.usage.prompt_tokens == len(prompt_ids)
    assert completion.usage.completion_tokens == MAX_TOKENS and completion.choices[0].finish_reason == "length"


def test_streamed_chat_applies_the_tokenizers_chat_template(archlm_server, model_dir):
    client, model_id = archlm_server
    stream = client.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0,
                                            stream=True)
    chunks = list(stream)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
    chat_ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=True)[
        "input_ids"]
    assert tokenizer.decode(chat_ids).endswith("<|im_start|>assistant\n")  # ChatML, the turn opened
    assert sum(1 for chunk in chunks if chunk.choices and chunk.choices[0].delta.content) > 1  # streamed, not whole
    assert text == greedy_continuation(model_dir, chat_ids)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage.prompt_tokens == len(chat_ids)  # the templated prompt, not the bare message


def test_a_native_export_serves_with_plain_transformers_serve(model_dir, tmp_path):
    native = tmp_path / "native"
    export_folder(model_dir, native)
    transformers_cli = Path(sys.executable).with_name("transformers")
    with running_server([str(transformers_cli), "serve", str(native)], tmp_path / "server.log",
                        tmp_path / "modules") as base_url:
        client = OpenAI(base_url=base_url, api_key="not-checked", max_retries=0, timeout=120)
        completion = client.completions.create(model=str(native), prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    tokenizer = AutoTokenizer.from_pretrained(native)
    assert completion.choices[0].text == greedy_continuation(model_dir, tokenizer(PROMPT)["input_ids"])


def test_folders_that_cannot_be_served_are_refused_naming_them(model_dir, tmp_path):
    missing = tmp_path / "no_such_run"
    with pytest.raises(SystemExit, match=f"model folder '{missing}' does not exist"):
        serve.main([str(missing)])
    with pytest.raises(SystemExit, match=f"'{tmp_path}' has no config.json"):
        serve.main([str(tmp_path)])
    native = tmp_path / "native"
    native.mkdir()
    (native / "config.json").write_text('{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}')
    with pytest.raises(SystemExit, match=f"'{native}' holds a 'llama' model, not an ArchLM one .* "
                                         f"`transformers serve {native}`"):
        serve.main([str(native)])


@pytest.mark.parametrize("overrides, message", [
    (dict(kv_lora_rank=16, qk_nope_head_dim=8, v_head_dim=8, num_key_value_heads=4), r"multi-head latent attention"),
    (dict(position_embedding_type="alibi"), r"ALiBi adds a bias"),
], ids=["latent-attention", "alibi"])
def test_continuous_batching_is_refused_at_startup_for_what_its_paged_cache_cannot_serve(model_dir, tmp_path,
                                                                                       overrides, message):
    """The server would start, then fail every request (HTTP 500, then 503 once its batching worker died)."""
    from conftest import tiny_config

    from archlm import ArchLMForCausalLM

    folder = tmp_path / "model"
    ArchLMForCausalLM(tiny_config(vocab_size=512, num_attention_heads=4, **overrides)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(folder)
    with pytest.raises(SystemExit, match=f"--continuous-batching: .*{message}.*without --continuous-batching"):
        serve.main([str(folder), "--continuous-batching"])
    serve.check_model_folder(str(folder))  # served without it


def test_help_is_transformers_serves_own_and_the_folder_comes_first(capsys):
    with pytest.raises(SystemExit) as exit_info:
        serve.main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert help_text.startswith(serve.USAGE) and "Usage: transformers serve [OPTIONS]" in help_text
    assert "--trust-remote-code" in help_text and "--continuous-batching" in help_text
    for argv in ([], ["--port", "8000"]):  # not transformers serve's load-on-demand mode
        with pytest.raises(SystemExit, match="usage: python -m archlm.serve MODEL_DIR"):
            serve.main(argv)
