"""A saved model loads as remote code (`trust_remote_code=True`) in a fresh process without archlm installed: the
same logits and generation, every Auto class, every preset."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from conftest import TINY, tiny_config
from test_modeling import build, random_ids

import archlm
from archlm import ArchLMConfig

VOCAB = TINY["vocab_size"]


REMOTE_SCRIPT = textwrap.dedent("""
    import sys
    sys.modules["archlm"] = None  # archlm is installed in this venv: hide it, as on a machine without it
    try:
        import archlm
    except ImportError:
        pass
    else:
        raise SystemExit("archlm should not be importable here")
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    folder = sys.argv[1]
    expected = torch.load(sys.argv[2])
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    assert type(config).__name__ == "ArchLMConfig", type(config)
    assert type(config).__module__.startswith("transformers_modules"), type(config).__module__
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__name__ == "ArchLMForCausalLM" and type(model).__module__.startswith("transformers_modules")
    with torch.no_grad():
        logits = model(input_ids=expected["input_ids"]).logits
    # another process may run another thread count, and so another matmul reduction order: equal to rounding
    torch.testing.assert_close(logits, expected["logits"], atol=1e-5, rtol=1e-5)
    generated = model.generate(expected["input_ids"], max_new_tokens=4, do_sample=False)
    assert torch.equal(generated, expected["generated"]), (generated, expected["generated"])
    base = AutoModel.from_pretrained(folder, trust_remote_code=True)
    assert type(base).__name__ == "ArchLMModel"
    assert base(input_ids=expected["input_ids"]).last_hidden_state.shape == (1, 5, config.hidden_size)
    classifier = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)
    assert type(classifier).__name__ == "ArchLMForSequenceClassification"
    print("REMOTE OK")
""")


def test_saved_folder_loads_as_remote_code_without_archlm_installed(tmp_path):
    model = build(tiny_config(position_embedding_type="alibi", norm_type="layernorm", qk_norm=True)).eval()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    input_ids = random_ids(1, 5)
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    generated = model.generate(input_ids, max_new_tokens=4, do_sample=False)
    torch.save({"input_ids": input_ids, "logits": logits, "generated": generated}, tmp_path / "expected.pt")

    files = {path.name for path in folder.iterdir()}
    assert {"configuration_archlm.py", "modeling_archlm.py", "model.safetensors", "config.json"} <= files
    assert not any(name.endswith(".bin") for name in files)
    package = Path(archlm.__file__).parent
    for name in ("configuration_archlm.py", "modeling_archlm.py"):
        assert (folder / name).read_text() == (package / name).read_text()
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert auto_map["AutoConfig"] == "configuration_archlm.ArchLMConfig"
    assert auto_map["AutoModel"] == "modeling_archlm.ArchLMModel"
    assert auto_map["AutoModelForCausalLM"] == "modeling_archlm.ArchLMForCausalLM"

    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run([sys.executable, "-c", REMOTE_SCRIPT, str(folder), str(tmp_path / "expected.pt")],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "REMOTE OK" in result.stdout


EVERY_PRESET_REMOTE_SCRIPT = textwrap.dedent("""
    import sys
    sys.modules["archlm"] = None  # as on a machine without archlm
    import torch
    from transformers import AutoModelForCausalLM

    expected = torch.load(sys.argv[1])
    for folder, case in expected.items():
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        with torch.no_grad():
            logits = model(input_ids=case["input_ids"]).logits
        # another process may run another thread count: equal to rounding
        torch.testing.assert_close(logits, case["logits"], atol=1e-5, rtol=1e-5, msg=folder)
        generated = model.generate(case["input_ids"], max_new_tokens=3, do_sample=False)
        assert torch.equal(generated, case["generated"]), folder
    print("REMOTE OK", len(expected))
""")


def test_a_saved_model_of_every_preset_loads_as_remote_code_without_archlm(tmp_path):
    """Every family's architecture (sandwich and sublayer-output norms, parallel blocks, soft-capping, per-layer
    types and rope, NoPE layers, interleaved and partial rotary, multipliers, ...) runs from the saved remote code."""
    expected = {}
    for preset in ArchLMConfig.presets():
        config = ArchLMConfig.from_preset(preset, vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                          num_attention_heads=4, num_hidden_layers=4, max_position_embeddings=64)
        model = build(config).eval()
        folder = str(tmp_path / preset)
        model.save_pretrained(folder)
        input_ids = random_ids(1, 6)
        with torch.no_grad():
            logits = model(input_ids=input_ids).logits
        generated = model.generate(input_ids, max_new_tokens=3, do_sample=False)
        expected[folder] = {"input_ids": input_ids, "logits": logits, "generated": generated}
    torch.save(expected, tmp_path / "expected.pt")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run([sys.executable, "-c", EVERY_PRESET_REMOTE_SCRIPT, str(tmp_path / "expected.pt")],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert f"REMOTE OK {len(ArchLMConfig.presets())}" in result.stdout


def test_a_model_loaded_as_remote_code_exports_to_transformers_and_gguf(tmp_path):
    """AutoModelForCausalLM with trust_remote_code, in a process that had not imported archlm, gives the folder's
    own copy of the class (in transformers_modules): to_transformers refused it ("exports an ArchLMForCausalLM, got
    ArchLMForCausalLM"), and write_gguf took it for a native model."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    from archlm.convert import to_transformers
    from archlm.gguf import write_gguf
    from archlm.tokenization_archlm import train_tokenizer

    config = tiny_config(vocab_size=300)
    build(config).save_pretrained(tmp_path / "model")
    remote_class = get_class_from_dynamic_module("modeling_archlm.ArchLMForCausalLM", str(tmp_path / "model"))
    assert remote_class is not archlm.ArchLMForCausalLM and remote_class.__module__.startswith("transformers_modules")
    model = remote_class.from_pretrained(tmp_path / "model").eval()
    native = to_transformers(model)
    assert type(native).__name__ == "LlamaForCausalLM"
    ids = random_ids(1, 6)
    with torch.no_grad():
        torch.testing.assert_close(native(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    tokenizer = train_tokenizer(["def f(x):\n    return x + 1\n"] * 50, 300)
    assert write_gguf(model, tokenizer, tmp_path / "model.gguf").stat().st_size > 0
