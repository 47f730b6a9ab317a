"""The streamed merge (core/merge/stream.py) against peft's merge_and_unload, its shards, fallbacks and failures."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from core.config import MergeConfig, ModelSource
from core.merge import stream as merge_stream
from core.merge.adapter import merge_adapter
from core.merge.stream import NotStreamable, plan_merge, stream_merge

REPO = Path(__file__).resolve().parents[2]


def make_adapter(base_dir: Path, out: Path, seed: int = 0, **lora) -> Path:
    """A LoRA adapter on `base_dir` with a random B (peft starts B at zero: the merge would be a no-op)."""
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    settings = dict(r=8, lora_alpha=16, target_modules="all-linear") | lora
    model = get_peft_model(base, LoraConfig(**settings))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    model.save_pretrained(out)
    return out


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def peft_merged(base_dir: Path, adapter: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    return PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().state_dict()


def assert_same_merge(ours: dict, theirs: dict, base: dict, dtype: torch.dtype) -> None:
    """Equal within one rounding of the merge dtype, measured against |W| + |merged|.

    peft rounds W to the merge dtype, adds the fp32 delta and rounds again; we add in fp32 and round once.
    Where W + delta nearly cancels, the two differ by up to one ulp of W, not of the (tiny) result.
    """
    eps = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[dtype]
    assert set(ours) <= set(theirs)
    for key, got in ours.items():
        want = theirs[key].cpu()
        assert got.dtype == want.dtype == dtype, key
        assert got.shape == want.shape, key
        scale = base[key].float().abs() + got.float().abs()
        err = (got.float() - want.float()).abs()
        assert bool((err <= eps * scale + 2.0**-24).all()), f"{key}: max err {float(err.max()):.3g}"


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model_dir) -> Path:
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter") / "a")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_streamed_merge_equals_peft_merge_and_unload(tmp_path, tiny_model_dir, adapter, dtype):
    torch_dtype = getattr(torch, dtype)
    stats = stream_merge(tiny_model_dir, adapter, tmp_path / "out", dtype)
    assert stats["merged_tensors"] == 14 and stats["shards"] == 1  # 7 linear layers x 2 blocks
    ours = weights(tmp_path / "out")
    base = weights(tiny_model_dir)
    assert_same_merge(ours, peft_merged(tiny_model_dir, adapter, torch_dtype), base, torch_dtype)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert (ours[q].float() - base[q].to(torch_dtype).float()).abs().max() > 1e-2  # the merge did something

    # tied embeddings stay tied: no lm_head tensor, the config still ties them
    assert "lm_head.weight" not in ours
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["dtype"] == dtype and config["tie_word_embeddings"] and "quantization_config" not in config
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= files
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp folder left


def test_streamed_logits_match_base_plus_adapter(tmp_path, tiny_model_dir, adapter):
    from peft import PeftModel

    stream_merge(tiny_model_dir, adapter, tmp_path / "out", "float16")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), str(adapter)
    )
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ids = torch.randint(0, merged.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want, plain = merged(ids).logits, reference(ids).logits, base(ids).logits
    assert (got - want).abs().max() / want.abs().max() < 5e-3
    assert (plain - want).abs().max() > 10 * (got - want).abs().max()  # the adapter mattered


def test_small_max_shard_size_gives_shards_and_a_valid_index(tmp_path, tiny_model_dir, adapter):
    limit = 50_000
    stats = stream_merge(tiny_model_dir, adapter, tmp_path / "sharded", "float16", max_shard_size="50KB")
    stream_merge(tiny_model_dir, adapter, tmp_path / "single", "float16")
    shards = sorted((tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) == stats["shards"] >= 3
    assert [p.name for p in shards] == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, 7)][
        : len(shards)
    ]
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    held, total, params = {}, 0, 0
    for shard in shards:
        tensors = load_file(shard)  # safetensors' own reader validates the header and offsets
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        assert size <= limit or len(tensors) == 1, shard.name  # only a single oversized tensor may exceed it
        held.update(dict.fromkeys(tensors, shard.name))
        total += size
        params += sum(t.numel() for t in tensors.values())
    assert index["weight_map"] == held
    assert index["metadata"] == {"total_size": total, "total_parameters": params}
    assert weights(tmp_path / "sharded").keys() == weights(tmp_path / "single").keys()
    for key, value in weights(tmp_path / "single").items():
        assert torch.equal(weights(tmp_path / "sharded")[key], value), key

    a = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded", dtype=torch.float32)
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "single", dtype=torch.float32)
    ids = torch.arange(1, 20)[None]
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


def test_rslora_and_per_module_rank_and_alpha(tmp_path, tiny_model_dir):
    adapter = make_adapter(
        tiny_model_dir,
        tmp_path / "rs",
        seed=3,
        use_rslora=True,
        rank_pattern={"q_proj": 4},
        alpha_pattern={"v_proj": 4},
    )
    plan = plan_merge(tiny_model_dir, adapter, "float16")
    scale = {t.target.module.split(".")[-1]: t.target.scale for t in plan.tensors if t.target is not None}
    assert scale["o_proj"] == pytest.approx(16 / math.sqrt(8))  # rslora: alpha / sqrt(r), not alpha / r
    assert scale["q_proj"] == pytest.approx(16 / math.sqrt(4))
    assert scale["v_proj"] == pytest.approx(4 / math.sqrt(8))

    # 4 KB chunks: every weight is merged a few rows at a time, as large ones are
    stream_merge(tiny_model_dir, adapter, tmp_path / "out", "float16", plan=plan, chunk_bytes=1 << 12)
    ours, base = weights(tmp_path / "out"), weights(tiny_model_dir)
    assert_same_merge(ours, peft_merged(tiny_model_dir, adapter, torch.float16), base, torch.float16)
    # and explicitly: W + alpha/sqrt(r) * B @ A, from the adapter's own factors
    ad = load_file(adapter / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers.1.self_attn.o_proj"
    delta = ad[f"{prefix}.lora_B.weight"] @ ad[f"{prefix}.lora_A.weight"]
    want = (base["model.layers.1.self_attn.o_proj.weight"] + 16 / math.sqrt(8) * delta).half()
    assert torch.allclose(ours["model.layers.1.self_attn.o_proj.weight"].float(), want.float(), atol=2e-3)


def test_conv1d_fan_in_fan_out_and_embedding_lora(tmp_path):
    """GPT-2 keeps Linear-like weights transposed (Conv1D); a LoRA on the (untied) embedding is transposed too."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    adapter = make_adapter(
        tmp_path / "gpt2", tmp_path / "a", target_modules=["c_attn", "c_proj", "c_fc", "wte"], fan_in_fan_out=True
    )
    plan = plan_merge(tmp_path / "gpt2", adapter, "float16")
    kinds = {t.key: t.target.transpose for t in plan.tensors if t.target is not None}
    assert kinds["transformer.h.0.attn.c_attn.weight"] and kinds["transformer.wte.weight"]
    stream_merge(tmp_path / "gpt2", adapter, tmp_path / "out", "float16", plan=plan, chunk_bytes=1 << 10)
    ours, base = weights(tmp_path / "out"), weights(tmp_path / "gpt2")
    assert_same_merge(ours, peft_merged(tmp_path / "gpt2", adapter, torch.float16), base, torch.float16)


def test_adapters_peft_must_merge_are_refused_with_reasons(tmp_path, tiny_model_dir):
    dora = make_adapter(tiny_model_dir, tmp_path / "dora", use_dora=True)
    with pytest.raises(NotStreamable, match="DoRA"):
        plan_merge(tiny_model_dir, dora, "float16")
    saved = make_adapter(tiny_model_dir, tmp_path / "mts", target_modules=["q_proj"], modules_to_save=["lm_head"])
    with pytest.raises(NotStreamable, match="modules_to_save"):
        plan_merge(tiny_model_dir, saved, "float16")
    tied = make_adapter(tiny_model_dir, tmp_path / "tied", target_modules=["q_proj", "embed_tokens"])
    with pytest.raises(NotStreamable, match="embed_tokens.*tied"):
        plan_merge(tiny_model_dir, tied, "float16")
    assert not (tmp_path / "out").exists()


def test_dora_falls_back_to_peft_merge(tmp_path, tiny_model_dir, tiny_splits):
    source = ModelSource(source="local", name=str(tiny_model_dir))
    dora = make_adapter(tiny_model_dir, tmp_path / "dora", use_dora=True)
    from core.artifacts import ModelFolder

    folder, info = merge_adapter(ModelFolder(dora), source, MergeConfig(), tiny_splits[1], tmp_path / "merged")
    assert info["method"] == "peft" and "DoRA" in info["fallback_reason"]
    assert info["logit_max_rel_diff"] < 2e-2 and info["shards"] == 1
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(folder.files())

    with pytest.raises(NotStreamable, match="merge.method is 'streamed'.*DoRA"):
        merge_adapter(ModelFolder(dora), source, MergeConfig(method="streamed"), tiny_splits[1], tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_merge_step_streams_plain_lora(tmp_path, tiny_model_dir, tiny_splits, adapter):
    from core.artifacts import ModelFolder

    source = ModelSource(source="local", name=str(tiny_model_dir))
    folder, info = merge_adapter(
        ModelFolder(adapter), source, MergeConfig(max_shard_size="1MB"), tiny_splits[1], tmp_path / "merged"
    )
    assert info["method"] == "streamed" and "fallback_reason" not in info
    assert info["logit_max_rel_diff"] < 2e-2 and info["shards"] == 2  # the 6 MB embedding alone, then the rest
    assert "model.safetensors.index.json" in folder.files()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no temp folders left


def test_failure_mid_write_leaves_no_output(tmp_path, tiny_model_dir, tiny_splits, adapter, monkeypatch):
    from core.artifacts import ModelFolder

    real_write, calls = merge_stream._write, []

    def failing_write(fh, tensor):
        calls.append(1)
        if len(calls) == 6:
            raise OSError("disk full (simulated)")
        return real_write(fh, tensor)

    monkeypatch.setattr(merge_stream, "_write", failing_write)
    parent = tmp_path / "outs"
    with pytest.raises(OSError, match="disk full"):
        stream_merge(tiny_model_dir, adapter, parent / "model", "float16", max_shard_size="50KB")
    assert len(calls) == 6 and list(parent.iterdir()) == []  # no shard, no temp folder

    calls.clear()
    source = ModelSource(source="local", name=str(tiny_model_dir))
    with pytest.raises(OSError, match="disk full"):
        merge_adapter(ModelFolder(adapter), source, MergeConfig(), tiny_splits[1], parent / "merged")
    assert list(parent.iterdir()) == []


@pytest.mark.bench
def test_benchmark_smoke_preset(tmp_path):
    out = tmp_path / "merge.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "merge.py"), "--preset", "smoke", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {r["row"]: r for r in result["rows"]}
    assert set(rows) == {"peft", "streamed"} and result["preset"] == "smoke"
    for r in rows.values():
        assert r["device"] in ("cpu", "cuda") and r["seconds"] > 0
        assert r["peak_rss_bytes"] >= r["rss_start_bytes"] > 0
        assert r["peak_over_largest_shard"] == pytest.approx(r["peak_rss_bytes"] / r["largest_input_shard_bytes"])
        assert r["output_shards"] >= 2  # 300KB shards of a ~1.5 MB fp16 model
    assert rows["streamed"]["merged_tensors"] == 14
    assert 0 <= rows["streamed"]["max_abs_diff"] < 1e-2  # fp16 rounding, not a different merge
    for name in ("torch", "transformers", "peft", "device"):
        assert result["environment"][name]
    assert "streamed" in proc.stdout and "peak/shard" in proc.stdout


def test_keep_in_fp32_weights_and_original_checkpoint_names(tmp_path):
    """GLM-4 MoE: a strict fp32 buffer stays fp32 (as from_pretrained keeps it); per-expert names stay as saved."""
    from peft import PeftModel
    from transformers import Glm4MoeConfig

    config = Glm4MoeConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        first_k_dense_replace=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "base")
    adapter = make_adapter(tmp_path / "base", tmp_path / "a", target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    stream_merge(tmp_path / "base", adapter, tmp_path / "out", "float16")
    ours, base = weights(tmp_path / "out"), weights(tmp_path / "base")
    assert ours.keys() == base.keys()  # the checkpoint's own layout, which from_pretrained converts on load
    assert {k for k, v in ours.items() if v.dtype != torch.float16} == {
        "model.layers.1.mlp.gate.e_score_correction_bias"
    }
    theirs = peft_merged(tmp_path / "base", adapter, torch.float16)
    assert theirs["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert_same_merge({k: v for k, v in ours.items() if "self_attn" in k}, theirs, base, torch.float16)

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32), str(adapter)
    )
    ids = torch.arange(1, 30)[None]
    with torch.no_grad():
        got, want = merged(ids).logits, reference(ids).logits
    assert (got - want).abs().max() / want.abs().max() < 5e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_merge_equals_cpu_merge(tmp_path, tiny_model_dir, adapter):
    stream_merge(tiny_model_dir, adapter, tmp_path / "cpu", "bfloat16", device="cpu")
    stats = stream_merge(tiny_model_dir, adapter, tmp_path / "cuda", "bfloat16", device="cuda", chunk_bytes=1 << 16)
    assert stats["device"].startswith("cuda")
    assert_same_merge(weights(tmp_path / "cuda"), weights(tmp_path / "cpu"), weights(tiny_model_dir), torch.bfloat16)
