"""`archlm.gguf`: ArchLM models written as llama.cpp GGUF files, read back by transformers' own GGUF loader and, where
llama-cpp-python is installed, by llama.cpp itself.

Each case is a tiny ArchLM model with every parameter randomised (norm weights around 1, biases non-zero), exported
through its native family. transformers' `from_pretrained(dir, gguf_file=...)` must give the ArchLM model's logits
(equal at f32, close at f16 and q8_0) and its `AutoTokenizer` the ArchLM tokenizer's ids; llama.cpp the same greedy
tokens and logits within 1e-3 of the largest at f32, also for the settings transformers' loader cannot read back
(`LLAMA_CPP_ONLY_CASES`). The llama.cpp tests are skipped where `llama_cpp` cannot be imported. What llama.cpp cannot
run is refused with a ValueError naming why, before any file is written.

    .venv/bin/python -m pytest tests/test_gguf.py -q
"""

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2_SPLIT

from archlm import ArchLMConfig, ArchLMForCausalLM
from archlm import gguf as archlm_gguf
from archlm.convert import main as convert_main
from archlm.gguf import ARCHLM_SPLIT_DIFFERENCE, LLAMA3_SPLIT, gguf_vocab, write_gguf
from archlm.tokenization_archlm import train_tokenizer

VOCAB = 320  # more than the tokenizer's 300: the ids it leaves empty are written as unused tokens
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=1)

# id -> (preset, overrides, the class transformers' GGUF loader builds). Where a value is set only because
# transformers' loader assumes it (see archlm/gguf.py), the comment says so.
CASES = {
    "llama-gqa": ("llama", dict(num_key_value_heads=2), "LlamaForCausalLM"),
    "llama-headdim16": ("llama", dict(num_key_value_heads=2, head_dim=16), "LlamaForCausalLM"),
    # a window as long as the context never cuts anything off: llama.cpp writes Mistral as "llama"
    "mistral-window-at-context": ("mistral", dict(num_key_value_heads=2, sliding_window=64), "LlamaForCausalLM"),
    "qwen2-qkvbias-tied": ("qwen2", dict(num_key_value_heads=2), "Qwen2ForCausalLM"),
    "qwen3-qknorm": ("qwen3", dict(num_key_value_heads=2, head_dim=128), "Qwen3ForCausalLM"),  # loader: head_dim 128
    "gpt2-tied": ("gpt2", dict(intermediate_size=128, max_position_embeddings=1024), "GPT2LMHeadModel"),  # loader: 4x, 1024
    "phi3": ("llama", dict(num_key_value_heads=2, converted_from="Phi3ForCausalLM"), "Phi3ForCausalLM"),
    "stablelm-quarter-rotary": ("stablelm", dict(num_key_value_heads=2), "StableLmForCausalLM"),
    "starcoder2-no-bias": ("starcoder2", dict(num_key_value_heads=2, sliding_window=None, attention_bias=False,
                                              mlp_bias=False, rope_parameters=dict(rope_type="default", rope_theta=1e4)),
                           "Starcoder2ForCausalLM"),  # loader: theta 1e4; llama.cpp gets the zero biases it requires
    "qwen2moe-shared-expert": ("qwen2", dict(num_experts=4, num_experts_per_tok=2, norm_topk_prob=False,
                                             moe_intermediate_size=1408, shared_expert_intermediate_size=5632),
                               "Qwen2MoeForCausalLM"),  # loader: the expert widths are Qwen2-MoE's defaults
    "qwen3moe": ("qwen3_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=768, head_dim=8),
                 "Qwen3MoeForCausalLM"),  # loader: expert width 768
}
# Settings transformers' GGUF loader cannot read back (see archlm/gguf.py), which only llama.cpp checks
LLAMA_CPP_ONLY_CASES = {
    "llama-biases": ("llama", dict(num_key_value_heads=2, attention_bias=True, mlp_bias=True), None),
    "qwen3-qkv-bias": ("qwen3", dict(num_key_value_heads=2, attention_bias=True, attention_output_bias=False), None),
    "phi3-half-rotary": ("llama", dict(converted_from="Phi3ForCausalLM", rope_parameters=dict(
        rope_type="default", rope_theta=1e4, partial_rotary_factor=0.5)), None),
    "stablelm-half-rotary-theta1e5": ("stablelm", dict(num_key_value_heads=2, rope_parameters=dict(
        rope_type="default", rope_theta=1e5, partial_rotary_factor=0.5)), None),
    "gpt2-narrow-mlp": ("gpt2", dict(intermediate_size=48), None),
    "qwen2moe-narrow-experts": ("qwen2", dict(num_experts=4, num_experts_per_tok=2, norm_topk_prob=False,
                                              moe_intermediate_size=32, shared_expert_intermediate_size=48), None),
}
ALL_CASES = {**CASES, **LLAMA_CPP_ONLY_CASES}
# max |logit difference| / max |logit| allowed at each dtype (measured on these cases: 0 at f32, at most 1.3e-3 at
# f16 and 3.5e-2 at q8_0)
TOLERANCE = {"f32": 1e-5, "f16": 5e-3, "q8_0": 1e-1}
PROSE = ["The quick brown fox jumps over the lazy dog.", "Hello, world! It's 2024; costs $3.50 (approx).",
         "First line.\nSecond line ends here.\n\nA new paragraph.", "naïve café, 東京, 🙂 and e\u0301"]


@pytest.fixture(scope="module")
def tokenizer():
    text = Path(archlm_gguf.__file__).read_text(encoding="utf-8")
    return train_tokenizer([text, *PROSE * 5], vocab_size=300)


def randomised(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter drawn at random: matrices and biases N(0, 0.1), norm weights 1 + N(0, 0.3)."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.normal_(0.0, 0.1)
            if parameter.ndim == 1 and name.endswith("weight"):
                parameter.normal_(1.0, 0.3)
    return model.eval()


def build(case: str) -> ArchLMForCausalLM:
    preset, overrides, _ = ALL_CASES[case]
    torch.manual_seed(0)
    return randomised(ArchLMForCausalLM(ArchLMConfig.from_preset(preset, **{**TINY, **overrides})))


def random_ids(count: int = 2, length: int = 16) -> torch.Tensor:
    return torch.randint(0, VOCAB, (count, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("case", CASES)
def test_transformers_gguf_loader_gives_the_archlm_logits(case, dtype, tokenizer, tmp_path):
    model = build(case)
    write_gguf(model, tokenizer, tmp_path / "model.gguf", dtype=dtype)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf").eval()
    assert type(loaded).__name__ == CASES[case][2]
    with torch.no_grad():
        ours, theirs = model(random_ids()).logits, loaded(random_ids()).logits
    error = ((theirs - ours).abs().max() / ours.abs().max()).item()
    assert error <= TOLERANCE[dtype], f"{case} at {dtype}: max |difference| / max |logit| = {error:.2e}"


def read_fields(path: Path) -> tuple[dict, dict]:
    """(metadata key -> value, tensor name -> (type name, shape)) of a GGUF file."""
    reader = gguf.GGUFReader(path)
    fields = {key: field.contents() for key, field in reader.fields.items()}
    tensors = {tensor.name: (tensor.tensor_type.name, tuple(int(n) for n in tensor.shape)) for tensor in reader.tensors}
    return fields, tensors


def test_llama_file_has_llama_cpp_names_types_and_tokenizer(tokenizer, tmp_path):
    model = build("llama-gqa")
    write_gguf(model, tokenizer, tmp_path / "model.gguf", dtype="f16")
    fields, tensors = read_fields(tmp_path / "model.gguf")

    assert fields["general.architecture"] == "llama"
    assert fields["general.name"] == model.config.architecture_name
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    assert (fields["llama.block_count"], fields["llama.embedding_length"], fields["llama.feed_forward_length"]) == (2, 32, 64)
    assert (fields["llama.attention.head_count"], fields["llama.attention.head_count_kv"]) == (4, 2)
    assert fields["llama.rope.freq_base"] == model.config.rope_parameters["rope_theta"]
    assert fields["llama.rope.dimension_count"] == 8
    assert fields["llama.context_length"] == 64
    # untied: the head has its own tensor; matrices f16, norms f32 (ggml's shapes are the transposes)
    assert tensors["output.weight"] == ("F16", (32, VOCAB))
    assert tensors["blk.1.attn_k.weight"] == ("F16", (32, 16))
    assert tensors["blk.0.attn_norm.weight"] == ("F32", (32,))
    assert set(tensors) == {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{i}.{name}.weight" for i in range(2)
        for name in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}

    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == "smaug-bpe"
    assert len(fields["tokenizer.ggml.tokens"]) == VOCAB
    assert fields["tokenizer.ggml.tokens"][:4] == ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert fields["tokenizer.ggml.tokens"][len(tokenizer)] == f"[PAD{len(tokenizer)}]"
    types = fields["tokenizer.ggml.token_type"]
    assert types[:4] == [gguf.TokenType.CONTROL] * 4
    assert set(types[4:len(tokenizer)]) == {gguf.TokenType.NORMAL}
    assert set(types[len(tokenizer):]) == {gguf.TokenType.UNUSED}
    assert len(fields["tokenizer.ggml.merges"]) == len(json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"])
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"]) == (1, 1)
    assert fields["tokenizer.ggml.padding_token_id"] == 0
    assert (fields["tokenizer.ggml.add_bos_token"], fields["tokenizer.ggml.add_eos_token"]) == (False, False)
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template


def test_tied_head_shares_token_embd_and_q8_0_keeps_norms_and_biases_f32(tokenizer, tmp_path):
    write_gguf(build("qwen2-qkvbias-tied"), tokenizer, tmp_path / "model.gguf", dtype="q8_0")
    fields, tensors = read_fields(tmp_path / "model.gguf")
    assert fields["general.architecture"] == "qwen2"
    assert "output.weight" not in tensors  # llama.cpp reuses token_embd for a tied head
    assert tensors["token_embd.weight"][0] == "Q8_0"
    assert tensors["blk.0.attn_q.weight"][0] == "Q8_0"
    assert tensors["blk.0.attn_q.bias"] == ("F32", (32,))
    assert tensors["output_norm.weight"][0] == "F32"


def test_starcoder2_without_biases_gets_the_zero_biases_llama_cpp_requires(tokenizer, tmp_path):
    model = build("starcoder2-no-bias")
    write_gguf(model, tokenizer, tmp_path / "model.gguf")
    reader = gguf.GGUFReader(tmp_path / "model.gguf")
    biases = {tensor.name: tensor.data for tensor in reader.tensors if tensor.name.endswith(".bias")}
    for name in ("attn_output", "ffn_up", "ffn_down"):
        assert not np.any(biases[f"blk.1.{name}.bias"])
    assert np.any(biases["blk.1.attn_norm.bias"])  # LayerNorm biases are the model's own


def test_gguf_tokenizer_encodes_prose_and_chat_like_archlm(tokenizer, tmp_path):
    write_gguf(build("llama-gqa"), tokenizer, tmp_path / "model.gguf")
    loaded = AutoTokenizer.from_pretrained(tmp_path, gguf_file="model.gguf")
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hi there."}], tokenize=False,
                                         add_generation_prompt=True)
    for text in [*PROSE, chat]:
        ids = tokenizer(text)["input_ids"]
        assert loaded(text)["input_ids"] == ids, repr(text)
        assert loaded.decode(ids) == text
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (1, 1, 0)


def test_archlm_split_is_written_as_the_nearest_and_its_difference_on_indented_code_is_warned(
        tokenizer, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="archlm.gguf"):
        write_gguf(build("llama-gqa"), tokenizer, tmp_path / "model.gguf")
    assert ARCHLM_SPLIT_DIFFERENCE in caplog.text
    loaded = AutoTokenizer.from_pretrained(tmp_path, gguf_file="model.gguf")
    code = "def f(x):\n    return x\n"
    assert loaded(code)["input_ids"] != tokenizer(code)["input_ids"]  # what the warning says
    assert loaded.decode(loaded(code)["input_ids"]) == code  # still lossless


def with_split(tokenizer: PreTrainedTokenizerFast, split: str, ignore_merges: bool = False,
               normalizer=None) -> PreTrainedTokenizerFast:
    """The ArchLM tokenizer's vocabulary and merges with another split: "llama3", "qwen2" (regexes), "gpt2"
    (ByteLevel's own regex) or "digits" (one llama.cpp has no built-in for)."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.pre_tokenizer = {
        "llama3": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"), byte_level]),
        "qwen2": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), "isolated"), byte_level]),
        "gpt2": pre_tokenizers.ByteLevel(add_prefix_space=False),
        "digits": pre_tokenizers.Sequence([pre_tokenizers.Digits(), byte_level]),
    }[split]
    backend.normalizer = normalizer
    state = json.loads(backend.to_str())
    state["model"]["ignore_merges"] = ignore_merges
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(state)), bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", pad_token="<|pad|>")


@pytest.mark.parametrize("split, ignore_merges, pre", [
    ("llama3", False, "smaug-bpe"), ("llama3", True, "llama-bpe"), ("qwen2", False, "qwen2"), ("gpt2", False, "gpt-2")])
def test_tokenizer_with_a_split_llama_cpp_has_is_written_exactly(tokenizer, split, ignore_merges, pre, tmp_path):
    other = with_split(tokenizer, split, ignore_merges)
    assert gguf_vocab(other, VOCAB).pre == pre
    if not ignore_merges:  # transformers' GGUF tokenizer applies every merge, as these do
        write_gguf(build("llama-gqa"), other, tmp_path / "model.gguf")
        loaded = AutoTokenizer.from_pretrained(tmp_path, gguf_file="model.gguf")
        code = "def f(x):\n    return x\n\n\nclass A:\n\tpass  # done 12345\r\n"
        assert loaded(code)["input_ids"] == other(code)["input_ids"]


def test_qwen2_nfc_normalizer_is_written_with_a_warning_and_other_normalizers_refused(tokenizer, caplog):
    with caplog.at_level("WARNING", logger="archlm.gguf"):
        assert gguf_vocab(with_split(tokenizer, "qwen2", normalizer=normalizers.NFC()), VOCAB).pre == "qwen2"
    assert "NFC-normalizes text; llama.cpp does not" in caplog.text
    with pytest.raises(ValueError, match=r"normalizes text \(Lowercase\)"):
        gguf_vocab(with_split(tokenizer, "qwen2", normalizer=normalizers.Lowercase()), VOCAB)


REFUSED_MODELS = {  # id -> (preset, overrides, what the message must name)
    "alibi-has-no-native-family": (
        "llama", dict(position_embedding_type="alibi"), r"(?s)llama\.cpp runs only.*`position_embedding_type`='alibi'"),
    "gemma-family-not-written": ("gemma", {}, r"family GemmaForCausalLM is not written yet: llama\.cpp runs it"),
    "mixtral-family-not-written": ("mixtral", dict(num_experts=4), r"MixtralForCausalLM.*reads no expert settings"),
    "rope-scaling": (
        "llama", dict(rope_parameters=dict(rope_type="linear", rope_theta=1e4, factor=2.0)), r"`rope_type`='linear'"),
    "sliding-window-that-cuts": (
        "mistral", dict(sliding_window=8),
        r"`sliding_window`=8 \(.*llama\.cpp's llama architecture attends to every earlier token"),
    "gpt2-exact-gelu": ("gpt2", dict(hidden_act="gelu"), r"`hidden_act`='gelu': llama\.cpp's gpt2 computes GELU's tanh"),
    "stablelm-qk-norm": (
        "stablelm", dict(qk_norm=True, qk_norm_scope="per_head", qk_norm_type="layernorm_nobias"), r"`qk_norm`=True"),
    "qwen2moe-renormalised": (
        "qwen2", dict(num_experts=4, shared_expert_intermediate_size=32, norm_topk_prob=True),
        r"`norm_topk_prob`=True: llama\.cpp's qwen2moe never"),
    "qwen3moe-dense-layer": ("qwen3_moe", dict(num_experts=4, mlp_only_layers=[0]), r"dense MLP layers \[0\]"),
}


@pytest.mark.parametrize("case", REFUSED_MODELS)
def test_what_llama_cpp_cannot_run_is_refused_naming_why_and_nothing_is_written(case, tokenizer, tmp_path):
    preset, overrides, message = REFUSED_MODELS[case]
    model = ArchLMForCausalLM(ArchLMConfig.from_preset(preset, **{**TINY, **overrides}))
    with pytest.raises(ValueError, match=message):
        write_gguf(model, tokenizer, tmp_path / "model.gguf")
    assert list(tmp_path.iterdir()) == []


def test_qwen3_bias_on_o_proj_is_refused_as_llama_cpp_has_no_tensor_for_it(tokenizer, tmp_path):
    def qwen3(**bias) -> ArchLMForCausalLM:
        return randomised(ArchLMForCausalLM(ArchLMConfig.from_preset("qwen3", **TINY, **bias)))

    with pytest.raises(ValueError, match=r"o_proj\.bias \(blk\.0\.attn_output\.bias\): llama\.cpp's qwen3 has no such"):
        write_gguf(qwen3(attention_bias=True, attention_output_bias=True), tokenizer, tmp_path / "model.gguf")
    # q/k/v biases alone are written (llama.cpp's qwen3 has them); the zero o_proj bias of the export is left out
    write_gguf(qwen3(attention_bias=True, attention_output_bias=False), tokenizer, tmp_path / "model.gguf")
    _, tensors = read_fields(tmp_path / "model.gguf")
    assert "blk.0.attn_q.bias" in tensors and "blk.0.attn_output.bias" not in tensors


def test_tokenizer_llama_cpp_cannot_reproduce_is_refused(tokenizer, tmp_path):
    word_level = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    word_level.pre_tokenizer, word_level.decoder = pre_tokenizers.Whitespace(), decoders.WordPiece()
    with pytest.raises(ValueError, match=r"byte-level BPE.*WordLevel"):
        write_gguf(build("llama-gqa"), PreTrainedTokenizerFast(tokenizer_object=word_level), tmp_path / "m.gguf")
    unknown_split = with_split(tokenizer, "digits")
    with pytest.raises(ValueError, match=r"built-in pre-tokenizers.*\['Digits', 'ByteLevel'\]"):
        write_gguf(build("llama-gqa"), unknown_split, tmp_path / "m.gguf")
    small = build("llama-gqa")
    small.resize_token_embeddings(100)
    with pytest.raises(ValueError, match=r"more than the model's vocab_size=100"):
        write_gguf(small, tokenizer, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_leaves_the_previous_file_and_no_partial_one(tokenizer, tmp_path, monkeypatch):
    target = tmp_path / "model.gguf"
    target.write_bytes(b"previous")

    def fail(self):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)
    with pytest.raises(OSError, match="disk full"):
        write_gguf(build("llama-gqa"), tokenizer, target)
    assert target.read_bytes() == b"previous"
    assert [path.name for path in tmp_path.iterdir()] == ["model.gguf"]


def test_cli_writes_a_saved_folder_and_refuses_to_overwrite_without_the_flag(tokenizer, tmp_path, capsys):
    model_dir = tmp_path / "model"
    build("qwen2-qkvbias-tied").save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "out" / "model-f16.gguf"
    convert_main(["--to-gguf", str(model_dir), str(out), "--dtype", "f16"])
    fields, tensors = read_fields(out)
    assert (fields["general.architecture"], fields["general.file_type"]) == ("qwen2", gguf.LlamaFileType.MOSTLY_F16)
    assert tensors["blk.0.ffn_up.weight"][0] == "F16"

    with pytest.raises(SystemExit):
        convert_main(["--to-gguf", str(model_dir), str(out)])
    assert "exists; pass --overwrite" in capsys.readouterr().err
    convert_main(["--to-gguf", str(model_dir), str(out), "--overwrite"])
    assert read_fields(out)[0]["general.file_type"] == gguf.LlamaFileType.ALL_F32


def test_cli_refuses_a_model_llama_cpp_cannot_run_before_loading_its_weights(tokenizer, tmp_path, capsys):
    model_dir = tmp_path / "model"
    ArchLMForCausalLM(ArchLMConfig.from_preset("gemma", **TINY)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    (model_dir / "model.safetensors").write_bytes(b"not read")  # a refusal must come before the weights are loaded
    with pytest.raises(SystemExit) as exit_info:
        convert_main(["--to-gguf", str(model_dir), str(tmp_path / "model.gguf")])
    assert exit_info.value.code == 2
    assert "GemmaForCausalLM" in capsys.readouterr().err
    assert not (tmp_path / "model.gguf").exists()


def test_cli_dtype_is_only_for_gguf(tmp_path, capsys):
    with pytest.raises(SystemExit):
        convert_main(["--to-native", str(tmp_path), str(tmp_path / "out"), "--dtype", "f16"])
    assert "--dtype applies to --to-gguf only" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# llama.cpp itself (llama-cpp-python), where it is installed
# ------------------------------------------------------------------------------------------------
LLAMA_CPP_CASES = list(ALL_CASES)


def llama_cpp_model(path: Path, n_ctx: int = 64):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=1, logits_all=True,
                           verbose=False, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)


def llama_cpp_greedy(llm, prompt: list[int], new_tokens: int) -> tuple[list[int], np.ndarray]:
    """Greedy tokens from llama.cpp's own logits, and its logits for the prompt."""
    llm.reset()
    llm.eval(prompt)
    prompt_logits = np.array(llm.scores[:len(prompt)])
    tokens = []
    for _ in range(new_tokens):
        tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(tokens[-1:])
    return tokens, prompt_logits


@torch.no_grad()
def archlm_greedy(model: ArchLMForCausalLM, prompt: list[int], new_tokens: int) -> list[int]:
    ids = list(prompt)
    for _ in range(new_tokens):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("case", LLAMA_CPP_CASES)
def test_llama_cpp_gives_the_archlm_greedy_tokens_and_logits_at_f32(case, tokenizer, tmp_path):
    pytest.importorskip("llama_cpp")
    model = build(case)
    write_gguf(model, tokenizer, tmp_path / "model.gguf")
    llm = llama_cpp_model(tmp_path / "model.gguf")
    prompt = random_ids(1, 8)[0].tolist()
    tokens, logits = llama_cpp_greedy(llm, prompt, new_tokens=16)
    assert tokens == archlm_greedy(model, prompt, new_tokens=16)
    with torch.no_grad():
        ours = model(torch.tensor([prompt])).logits[0].numpy()
    np.testing.assert_allclose(logits, ours, rtol=0, atol=1e-3 * np.abs(ours).max())


def test_llama_cpp_tokenizes_prose_like_archlm_and_code_with_llama3s_split(tokenizer, tmp_path):
    pytest.importorskip("llama_cpp")
    write_gguf(build("llama-gqa"), tokenizer, tmp_path / "model.gguf")
    llm = llama_cpp_model(tmp_path / "model.gguf")
    for text in PROSE:
        assert llm.tokenize(text.encode(), add_bos=False) == tokenizer(text)["input_ids"], repr(text)
        assert llm.detokenize(tokenizer(text)["input_ids"]).decode() == text
    assert (llm.token_bos(), llm.token_eos()) == (1, 1)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hi there."}], tokenize=False,
                                         add_generation_prompt=True)
    assert llm.tokenize(chat.encode(), add_bos=False, special=True) == tokenizer(chat)["input_ids"]
    code = "def f(x):\n    return x\n\n\nclass A:\n\tpass  # done 12345\r\n"
    assert llm.tokenize(code.encode(), add_bos=False) == with_split(tokenizer, "llama3")(code)["input_ids"]
    assert llm.tokenize(code.encode(), add_bos=False) != tokenizer(code)["input_ids"]  # ARCHLM_SPLIT_DIFFERENCE
