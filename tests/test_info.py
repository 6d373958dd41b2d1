"""`moe-inspect info`: published sizes of real configs, per-layer and dense configs, JSON, and bad input.

Real configs (fixtures/configs, copied from the published checkpoints) are built on the meta device,
so a 671 B model costs a fraction of a second and no memory.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import psutil
import pytest
import typer
from typer.testing import CliRunner

from moe_inspect.analysis.info import BYTES_PER_PARAM, build_meta_model, describe
from moe_inspect.analysis.model_info import ModelInfo
from moe_inspect.cli.info import info
from moe_inspect.errors import UserError
from moe_inspect.model.source import load_config
from moe_inspect.render.info import layer_ranges, render_info

CONFIGS = Path(__file__).resolve().parent.parent / "fixtures" / "configs"
JSON_KEYS = {
    "model_type", "num_layers", "moe_layers", "num_experts", "top_k", "shared_experts", "total_params",
    "routed_expert_params", "active_params", "active_params_excl_input_embedding",
}

app = typer.Typer()
app.command()(info)
runner = CliRunner()


@pytest.fixture(scope="module")
def mixtral() -> ModelInfo:
    return describe(load_config(str(CONFIGS / "mixtral-8x7b" / "config.json")))


@pytest.fixture(scope="module")
def deepseek() -> ModelInfo:
    return describe(load_config(str(CONFIGS / "deepseek-v3")))


def _invoke_ok(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout


def _fails_cleanly(args: list[str], needle: str) -> str:
    """Exit 2, one sentence on stderr, no traceback."""
    result = runner.invoke(app, args)
    stderr = result.stderr
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert needle in stderr, stderr
    return stderr


# ------------------------------------------------------------------------------------------ published sizes


def test_mixtral_matches_published_figures(mixtral: ModelInfo) -> None:
    assert mixtral.model_type == "mixtral"
    assert mixtral.model_class == "MixtralForCausalLM"
    assert mixtral.total_params == 46_702_792_704  # "46.7B"
    assert mixtral.routed_expert_params == 45_097_156_608
    # "12.9B active": the total minus 6 of 8 experts (3 * 4096 * 14336 each) in 32 layers, worked out by hand
    assert mixtral.active_params == 46_702_792_704 - 32 * 6 * 3 * 4096 * 14336 == 12_879_925_248
    assert (mixtral.num_layers, mixtral.moe_layers, mixtral.dense_layers) == (32, list(range(32)), [])
    assert (mixtral.num_experts, mixtral.top_k, mixtral.shared_experts) == (8, 2, 0)
    assert not mixtral.tied_embeddings
    assert mixtral.input_embedding_params == 32000 * 4096
    assert mixtral.active_params_excl_input_embedding == 12_879_925_248 - 32000 * 4096 == 12_748_853_248
    assert "softmax" in mixtral.routing_rule.lower() and "top-2" in mixtral.routing_rule


def test_deepseek_v3_matches_published_figures(deepseek: ModelInfo) -> None:
    assert deepseek.model_type == "deepseek_v3"
    assert deepseek.total_params == 671_026_404_352  # 671B: transformers does not build the MTP layer
    assert deepseek.routed_expert_params == 653_908_770_816
    # "37B activated": 248 of 256 experts (3 * 7168 * 2048 each) idle in each of the 58 MoE layers
    assert deepseek.active_params == 671_026_404_352 - 58 * 248 * 3 * 7168 * 2048 == 37_552_282_624
    assert deepseek.input_embedding_params == 129_280 * 7168
    assert deepseek.active_params_excl_input_embedding == 37_552_282_624 - 129_280 * 7168
    assert deepseek.num_layers == 61
    assert deepseek.moe_layers == list(range(3, 61)) and len(deepseek.moe_layers) == 58
    assert deepseek.dense_layers == [0, 1, 2]
    assert (deepseek.num_experts, deepseek.top_k, deepseek.shared_experts) == (256, 8, 1)
    assert deepseek.activation_ratio == pytest.approx(deepseek.active_params / deepseek.total_params)
    assert any("multi-token-prediction" in note for note in deepseek.notes)


def test_deepseek_v3_routing_rule_in_words(deepseek: ModelInfo) -> None:
    rule = deepseek.routing_rule
    for phrase in ("sigmoid", "bias-corrected", "group-limited", "n_group=8", "topk_group=4", "2.5", "renormalised",
                   "1 shared expert"):
        assert phrase in rule.lower() or phrase in rule, (phrase, rule)


def test_active_is_total_minus_unchosen_experts(deepseek: ModelInfo) -> None:
    per_layer = deepseek.routed_expert_params / 58
    assert deepseek.active_params == round(deepseek.total_params - 58 * per_layer * (1 - 8 / 256))
    assert sum(entry.routed_expert_params for entry in deepseek.layers) == deepseek.routed_expert_params


def test_memory_table(mixtral: ModelInfo, deepseek: ModelInfo) -> None:
    """Weight bytes from the published parameter counts and the formats' own sizes (not the code's constants)."""
    assert set(mixtral.memory) == set(BYTES_PER_PARAM) == {"fp32", "bf16", "fp8", "int8", "int4"}
    bits = {"fp32": 32, "bf16": 16, "fp8": 8, "int8": 8, "int4": 4}
    published = ((mixtral, 46_702_792_704, 12_879_925_248), (deepseek, 671_026_404_352, 37_552_282_624))
    for described, total, active in published:
        for dtype, width in bits.items():
            assert described.memory[dtype] == {"all": total * width // 8, "active": active * width // 8}, dtype
    assert mixtral.memory["bf16"]["all"] == 93_405_585_408  # 86.99 GiB
    assert deepseek.memory["fp8"]["all"] == 671_026_404_352  # the published FP8 checkpoint: one byte a weight


def test_deepseek_v3_is_fast_and_allocates_nothing() -> None:
    """accelerate's default init_empty_weights() would try to allocate 30 GB here (fused experts)."""
    from transformers import DeepseekV3Config

    warm = DeepseekV3Config(  # imports the modeling code, so the timing below is the build and count only
        vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_group=2, topk_group=1,
        q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, first_k_dense_replace=1,
    )
    describe(warm)
    process = psutil.Process()
    rss_before = process.memory_info().rss
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    result = describe(load_config(str(CONFIGS / "deepseek-v3" / "config.json")))
    elapsed = time.perf_counter() - start
    grown = process.memory_info().rss - rss_before
    peak_grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - peak_before
    assert result.total_params == 671_026_404_352
    assert elapsed < 2.0, elapsed
    assert grown < 100 * 2**20, grown
    assert peak_grown < 100 * 2**20, peak_grown


def test_model_is_built_on_meta(mixtral: ModelInfo) -> None:
    from transformers import MixtralConfig

    model = build_meta_model(MixtralConfig(num_hidden_layers=1))
    assert {p.device.type for p in model.parameters()} == {"meta"}


# ------------------------------------------------------------------------------------ per-layer and dense


def test_per_layer_top_k() -> None:
    """HunYuan's moe_topk is a per-layer list: each layer's routed experts count with its own k/E."""
    result = describe(load_config(str(CONFIGS / "tiny-hunyuan-per-layer")))
    assert result.moe_layers == [0, 1, 2, 3]
    assert result.num_experts == 8
    assert result.top_k == [1, 2, 4, 2]
    assert [entry.top_k for entry in result.layers] == [1, 2, 4, 2]
    per_layer = [entry.routed_expert_params for entry in result.layers]
    inactive = sum(routed * (1 - k / 8) for routed, k in zip(per_layer, [1, 2, 4, 2], strict=True))
    assert result.active_params == round(result.total_params - inactive)
    assert "top-1/2/4" in result.routing_rule


def test_dense_model_is_reported_not_refused() -> None:
    result = describe(load_config(str(CONFIGS / "tiny-llama-dense")))
    assert result.moe_layers == [] and result.dense_layers == [0, 1]
    assert (result.num_experts, result.top_k, result.shared_experts) == (0, 0, 0)
    assert result.routed_expert_params == 0
    assert result.active_params == result.total_params
    assert result.tied_embeddings
    # tied: the embedding matrix is the LM head, so excluding the input embedding removes nothing
    assert result.active_params_excl_input_embedding == result.active_params
    assert "dense" in result.routing_rule.lower()


def _tiny(model_type: str, **kwargs: object) -> ModelInfo:
    from transformers import CONFIG_MAPPING

    return describe(CONFIG_MAPPING[model_type](**kwargs))


def _named_params(result_model: object, *needles: str) -> int:
    return sum(p.numel() for n, p in result_model.named_parameters() if any(s in n for s in needles))  # type: ignore[attr-defined]


def test_families_without_an_experts_attribute() -> None:
    """DBRX (E only in ffn_config), JetMoE (MoA + MoE, no `experts`), Doge (experts are embeddings)."""
    from transformers import CONFIG_MAPPING

    dbrx_config = CONFIG_MAPPING["dbrx"](
        d_model=64, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=128,
        ffn_config={"ffn_hidden_size": 32, "moe_num_experts": 8, "moe_top_k": 2},
        attn_config={"kv_n_heads": 4, "rope_theta": 10000.0, "clip_qkv": 8.0},
    )
    dbrx = describe(dbrx_config)
    assert (dbrx.num_experts, dbrx.top_k) == (8, 2)
    assert dbrx.routed_expert_params == 2 * 3 * 8 * 32 * 64
    assert dbrx.active_params == dbrx.total_params - dbrx.routed_expert_params * 6 // 8

    jet_config = CONFIG_MAPPING["jetmoe"](
        vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        num_local_experts=8, num_experts_per_tok=2, intermediate_size=128, kv_channels=16,
    )
    jet_model = build_meta_model(jet_config)
    jet = describe(jet_model)
    assert [r.kind for r in jet.routers] == ["mlp", "attention"] * 2
    assert jet.routed_expert_params == _named_params(jet_model, "input_linear", "output_linear")
    assert "attention experts" in jet.routing_rule

    doge_config = CONFIG_MAPPING["doge"](
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, is_moe=True, num_experts=16, num_experts_per_tok=2,
    )
    doge_model = build_meta_model(doge_config)
    doge = describe(doge_model)
    assert doge.routed_expert_params == _named_params(doge_model, "down_embed", "up_embed") == 2 * 2 * 16 * 64
    assert "product-key" in doge.routing_rule.lower()


def test_remote_code_model_matched_by_structure(tmp_path: Path) -> None:
    """A model type transformers does not know declares no routers; info finds gate + experts by structure."""
    from tiny_models import write_remote_code

    config = {
        "vocab_size": 128, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 6, "num_experts_per_tok": 2,
    }
    write_remote_code(tmp_path, "tiny_info_remote_moe", config)
    with pytest.raises(UserError, match="`trust_remote_code=True`"):
        load_config(str(tmp_path))
    remote = describe(load_config(str(tmp_path), trust_remote_code=True), trust_remote_code=True)
    native = _tiny(
        "mixtral", vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2,
    )
    assert remote.heuristic and remote.notes
    assert (remote.num_experts, remote.top_k, remote.moe_layers) == (6, 2, [0, 1])
    assert (remote.total_params, remote.active_params) == (native.total_params, native.active_params)


# ------------------------------------------------------------------------------------------------- JSON / CLI


def test_json_has_the_documented_keys(deepseek: ModelInfo) -> None:
    data = deepseek.to_dict()
    assert set(data) >= JSON_KEYS
    assert data["layers"][0] == {
        "layer": 0, "kind": "dense", "experts": 0, "top_k": 0, "shared_experts": 0, "routed_expert_params": 0,
        "stack": "decoder",
    }
    assert data["stacks"] == []  # only encoder-decoders list their stacks
    assert data["layers"][3]["kind"] == "moe" and data["layers"][3]["experts"] == 256
    assert set(data["memory"]["int4"]) == {"all", "active"}
    json.dumps(data)  # plain data all the way down


def test_cli_json_is_one_object() -> None:
    stdout = _invoke_ok(str(CONFIGS / "mixtral-8x7b" / "config.json"), "--json")
    data = json.loads(stdout)
    assert set(data) >= JSON_KEYS
    assert data["total_params"] == 46_702_792_704
    assert data["num_experts"] == 8 and data["top_k"] == 2


def test_cli_panel(deepseek: ModelInfo) -> None:
    stdout = _invoke_ok(str(CONFIGS / "deepseek-v3"))
    for text in ("deepseek_v3", "DeepseekV3ForCausalLM", "58 MoE: 3-60", "3 dense: 0-2", "671.03 B",
                 "37.55 B", "excl. input embedding", "bf16", "GiB"):
        assert text in stdout, (text, stdout)


def test_cli_panel_dense_and_per_layer() -> None:
    dense = _invoke_ok(str(CONFIGS / "tiny-llama-dense"))
    assert "all dense" in dense and "0 routed experts" in dense and "tied" in dense
    per_layer = _invoke_ok(str(CONFIGS / "tiny-hunyuan-per-layer"))
    assert "top-4 (layer 2)" in per_layer and "top-2 (layers 1, 3)" in per_layer


def test_render_to_a_narrow_console(mixtral: ModelInfo) -> None:
    from rich.console import Console

    console = Console(width=60, record=True, color_system=None)
    render_info(mixtral, console)
    assert "46.70 B" in console.export_text()


def test_layer_ranges() -> None:
    assert layer_ranges([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8"
    assert layer_ranges([3]) == "3"
    assert layer_ranges([]) == ""


# ---------------------------------------------------------------------------------------------- bad input


def test_missing_path() -> None:
    _fails_cleanly(["./no/such/config.json"], "No such file or folder")


def test_folder_without_config(tmp_path: Path) -> None:
    _fails_cleanly([str(tmp_path)], "has no config.json")


def test_malformed_json(tmp_path: Path) -> None:
    bad = tmp_path / "config.json"
    bad.write_text('{"model_type": "mixtral", "hidden_size": 64,,}')
    _fails_cleanly([str(bad)], "is not valid JSON")
    bad.write_text("[1, 2, 3]")
    _fails_cleanly([str(bad)], "not the object a config.json holds")


def test_missing_model_type(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"hidden_size": 64}')
    _fails_cleanly([str(tmp_path)], "has no model_type")


def test_unknown_model_type_suggests_remote_code(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "brand_new_moe", "num_experts": 8}')
    _fails_cleanly([str(tmp_path)], "--trust-remote-code")
    _fails_cleanly([str(tmp_path), "--trust-remote-code"], "names no code of its own")


def test_invalid_config_values(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "hunyuan_v1_moe", "num_experts": [4, 8]}')
    _fails_cleanly([str(tmp_path)], "is not a valid hunyuan_v1_moe config")


def test_hub_id_offline_without_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    _fails_cleanly(["someone/not-cached-moe"], "not in the local Hugging Face cache and the machine is offline")


def test_config_transformers_cannot_build(tmp_path: Path) -> None:
    """DBRX without attn_config.rope_theta loads as a config but fails in the model's __init__."""
    (tmp_path / "config.json").write_text('{"model_type": "dbrx", "d_model": 64, "n_heads": 4, "n_layers": 1}')
    _fails_cleanly([str(tmp_path)], "transformers could not build a 'dbrx' model")
