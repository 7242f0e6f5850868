"""benchmarks/: the scripts run end to end at a tiny size and write what docs/performance.md is built from.

No timings are asserted (speed is measured, not tested); what is checked is that every figure is there, that the
compared models hold the same weights, and that the eager floor of decode_budget.py computes ArchLM's logits.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = ["--hidden", "64", "--layers", "2", "--heads", "4", "--kv_heads", "2", "--vocab", "256"]


def run_benchmark(name: str, *args: str, model_flags=TINY) -> None:
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / f"{name}.py"), *model_flags, *args], cwd=REPO,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]


def test_interleaved_alternates_which_model_goes_first_and_keeps_each_pairs_ratio(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from common import interleaved

    calls, times = [], {"archlm": iter([1.0, 2.0, 4.0, 1.0]), "mixtral": iter([3.0, 2.0, 1.0, 3.0])}

    def measure(name):
        calls.append(name)
        return next(times[name])

    result = interleaved({"archlm": "archlm", "mixtral": "mixtral"}, measure, 3)
    assert calls == ["archlm", "mixtral"] + ["archlm", "mixtral", "mixtral", "archlm", "archlm", "mixtral"]
    assert result == {"archlm": 2.0, "mixtral": 2.0}  # medians of the 3 pairs (the first call of each is a warm-up)
    assert result.pair_ratios() == [0.25, 1.0, 3.0]  # mixtral / archlm per pair, sorted
    assert result.pair_ratios("mixtral") == [1 / 3, 1.0, 4.0]


@pytest.mark.slow
def test_decode_budget_floor_matches_archlm_and_every_step_is_timed(tmp_path):
    run_benchmark("decode_budget", "--steps", "4", "--rounds", "1", "--output_dir", str(tmp_path))
    results = json.loads((tmp_path / "decode_budget.json").read_text())
    assert results["floor_max_abs_logit_difference"] <= 1e-5
    assert set(results["ms_per_token"]) == {
        "matmuls only", "eager floor", "ArchLM forward", "Llama forward", "ArchLM forward, compiled",
        "Llama forward, compiled", "ArchLM generate", "Llama generate"}
    assert all(ms > 0 for ms in results["ms_per_token"].values())
    assert (tmp_path / "decode_budget.png").stat().st_size > 0 and (tmp_path / "decode_budget.md").exists()


@pytest.mark.slow
def test_vs_llama_reports_every_row_for_both_models(tmp_path):
    run_benchmark("vs_llama", "--seq", "32", "--batch", "2", "--pairs", "1", "--decode_prompt", "8",
                  "--decode_tokens", "4", "--output_dir", str(tmp_path))
    results = json.loads((tmp_path / "vs_llama.json").read_text())
    measures = [row["measure"] for row in results["rows"]]
    assert measures == [
        "forward tokens/s", "train step tokens/s", "train step tokens/s (compiled)", "decode tokens/s (dynamic cache)",
        "decode tokens/s (static cache)", "decode tokens/s (static cache, compiled)", "train MFU %",
        "train MFU % (compiled)", "train step peak MiB"]
    assert all(row["archlm"] > 0 and row["llama"] > 0 for row in results["rows"])
    assert results["matmul_tflops"]["float32"] > 0
    assert "| forward tokens/s |" in (tmp_path / "vs_llama.md").read_text()


def test_floor_decoder_refuses_what_it_does_not_implement():
    """The hand-written floor covers the llama preset only; anything else is refused, not silently mis-timed."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from decode_budget import FloorDecoder
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    from archlm import ArchLMConfig, ArchLMForCausalLM

    config = ArchLMConfig.from_preset("gpt2", hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                      vocab_size=128, bos_token_id=1, eos_token_id=1)
    with pytest.raises(SystemExit, match="llama preset"):
        FloorDecoder(ArchLMForCausalLM(config), max_length=16)
    llama = ArchLMConfig.from_preset("llama", hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=128)
    assert FloorDecoder(ArchLMForCausalLM(llama), max_length=16).keys.shape == (1, 1, 2, 16, 16)  # accepted


@pytest.mark.slow
def test_vs_mixtral_reports_every_row_for_both_models(tmp_path):
    run_benchmark("vs_mixtral", "--experts", "4", "--expert_width", "32", "--seq", "16", "--batch", "2", "--pairs", "1",
                  "--decode_prompt", "8", "--decode_tokens", "4", "--output_dir", str(tmp_path))
    results = json.loads((tmp_path / "vs_mixtral.json").read_text())
    assert [row["measure"] for row in results["rows"]] == [
        "forward tokens/s", "train step tokens/s", "decode tokens/s (dynamic cache)",
        "decode tokens/s (static cache, compiled)"]
    assert all(row["archlm"] > 0 and row["mixtral"] > 0 for row in results["rows"])
    assert 0 < results["active_parameters"] < results["parameters"]
    assert all(len(row["pair_ratios"]) == 1 for row in results["rows"])
    assert "| pairs ArchLM won (median pair) |" in (tmp_path / "vs_mixtral.md").read_text()
    assert "| forward tokens/s |" in (tmp_path / "vs_mixtral.md").read_text()


@pytest.mark.slow
def test_vs_deepseek_reports_decoding_at_each_context_and_the_caches(tmp_path):
    run_benchmark("vs_deepseek", "--layers", "2", "--hidden", "64", "--heads", "4", "--vocab", "256", "--contexts",
                  "8,24", "--decode_tokens", "3", "--pairs", "1", "--output_dir", str(tmp_path), model_flags=[])
    results = json.loads((tmp_path / "vs_deepseek.json").read_text())
    assert [row["measure"] for row in results["rows"]] == [
        "decode tokens/s at context 8", "decode tokens/s at context 24", "cache numbers per token (all layers)"]
    assert all(row["archlm"] > 0 and row["deepseek"] > 0 for row in results["rows"])
    # both cache the latent (256) and the rotary key (32) in each layer
    assert results["rows"][-1]["archlm"] == results["rows"][-1]["deepseek"] == 2 * (256 + 32)
    assert (tmp_path / "vs_deepseek.png").stat().st_size > 0


@pytest.mark.slow
def test_loss_chunks_checks_and_times_the_plain_path_and_every_chunk_size(tmp_path):
    # 1,000 tokens x vocabulary 20,000: loss_chunk_size gives 838-token chunks, added to those asked for (400 and
    # 2,000, cut to the 1,000 tokens there are)
    run_benchmark("loss_chunks", "--tokens", "1000", "--hidden", "16", "--vocab", "20000", "--chunks", "400,2000",
                  "--rounds", "1", "--output_dir", str(tmp_path), model_flags=[])
    results = json.loads((tmp_path / "loss_chunks.json").read_text())
    assert [(row["chunk"], row["default"]) for row in results["rows"]] == [
        (None, False), (400, False), (838, True), (1000, False)]
    assert results["default_chunk"] == 838 and all(row["ms"] > 0 and row["vs_plain"] > 0 for row in results["rows"])
    assert (tmp_path / "loss_chunks.png").stat().st_size > 0 and "838 *" in (tmp_path / "loss_chunks.md").read_text()


def test_experts_paths_checks_and_times_every_way_at_each_size(tmp_path):
    run_benchmark("experts_paths", "--hidden", "32", "--experts", "4", "--top_k", "2", "--expert_width", "16",
                  "--tokens", "1,2", "--stacks", "2", "--rounds", "1", "--output_dir", str(tmp_path), model_flags=[])
    results = json.loads((tmp_path / "experts_paths.json").read_text())
    ways = {(row["tokens"], row["way"]) for row in results["rows"]}
    compiled_and_eager = {"grouped", "gathered", "grouped, compiled", "gathered, compiled"}
    assert ways == {(1, way) for way in compiled_and_eager | {"one_token"}} | {(2, way) for way in compiled_and_eager}
    assert all(row["us_per_layer"] > 0 for row in results["rows"])
    assert (tmp_path / "experts_paths.png").stat().st_size > 0
