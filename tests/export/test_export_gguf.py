"""GGUF export (steps/export_gguf.py): the file llama.cpp and Ollama load, checked against the merged model.

The file is read here with transformers' own GGUF reader and Q/K un-permutation, not with the exporter's code.
"""

import json
from typing import Annotated

import numpy as np
import pytest
import torch
from conftest import build_tiny_model, qa_rows
from datasets import Dataset
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers.integrations.gguf.reader import GgufHeader, read_gguf_metadata
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor
from zenml import Model, pipeline, step

import core.export.gguf as export_module
from core.artifacts import ModelFolder
from core.config import ExportConfig, ModelSource
from core.export.gguf import GGUFExportError, GGUFMismatchError, check_tokenizer, export_model, write_gguf
from core.models import resolve_base
from steps.export_gguf import export_gguf

STRING_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges")
F32, F16 = 0, 1  # ggml type ids


def save_f16_copy(src, out):
    """A folder shaped like merge's output: f16 safetensors, config and tokenizer."""
    LlamaForCausalLM.from_pretrained(src, dtype=torch.float16).save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


def read_tensors(path) -> dict[str, np.ndarray]:
    """Every tensor in the file, in torch order, read with transformers' GGUF header parser."""
    header = GgufHeader.from_file(str(path))
    blob = np.memmap(path, mode="r", dtype=np.uint8)
    out = {}
    for t in header.tensors:
        raw = blob[header.data_start + t.offset : header.data_start + t.offset + t.nbytes]
        out[t.name] = np.frombuffer(raw.tobytes(), dtype={F32: np.float32, F16: np.float16}[t.ggml_type]).reshape(
            t.shape
        )
    return out


def build_small_tokenizer(out, chat_template: str):
    """A byte-level BPE tokenizer shaped like SmolLM2's (ChatML specials, same chat template) with 600 tokens
    instead of 49152: transformers' GGUF loader parses a vocabulary in Python, seconds per load for SmolLM2's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [m["content"] for conv in qa_rows(48)["messages"] for m in conv] + export_module.TOKENIZER_PROBES * 3
    corpus += ["Hello world, the refund window is 30 days.", "You answer Acme customer support questions."] * 5
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
    )
    fast.chat_template = chat_template
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def merged_dir(tmp_path_factory, bundled_tokenizer_dir):
    """conftest's tiny Llama on the small tokenizer, saved the way merge saves a merged model (f16)."""
    root = tmp_path_factory.mktemp("merged")
    template = AutoTokenizer.from_pretrained(bundled_tokenizer_dir).chat_template
    tiny = build_tiny_model(root / "f32", build_small_tokenizer(root / "tok", template))
    return save_f16_copy(tiny, root / "model")


@pytest.fixture(scope="module")
def rows(merged_dir):
    tok = AutoTokenizer.from_pretrained(merged_dir)
    return [tok.apply_chat_template(m, tokenize=True, return_dict=True)["input_ids"] for m in qa_rows(4)["messages"]]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, merged_dir, rows):
    out = tmp_path_factory.mktemp("gguf") / "gguf"
    folder, info = export_model(
        ModelFolder(merged_dir),
        rows,
        ExportConfig(converter="builtin"),
        out,
        "tiny-chat",
        base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
        system_prompt="You answer Acme customer support questions.",
    )
    return folder, info


def test_round_trip_matches_logits_and_tokenizer(exported, rows):
    folder, info = exported
    assert folder.files() == ["Modelfile", "tiny-chat-F16.gguf"]
    # f16 weights are stored as they are, so transformers' loader reproduces the logits exactly
    assert info["logit_max_rel_diff"] < 1e-5
    assert info["checked_rows"] == len(rows) and info["checked_tokens"] == sum(map(len, rows))
    assert info["tokenizer_texts_checked"] == len(export_module.TOKENIZER_PROBES) + len(rows)
    assert info["gguf_bytes"] == (folder.path / "tiny-chat-F16.gguf").stat().st_size


def test_weights_are_exact_after_transformers_unpermutes_them(exported, merged_dir):
    from safetensors.torch import load_file

    folder, _ = exported
    hf = load_file(str(merged_dir / "model.safetensors"))
    tensors = read_tensors(folder.path / "tiny-chat-F16.gguf")
    cfg = json.loads((merged_dir / "config.json").read_text())
    undo = LlamaTensorProcessor(config=cfg)  # what transformers' GGUF loader applies to attn_q / attn_k
    q = tensors["blk.1.attn_q.weight"]
    assert not np.array_equal(q, hf["model.layers.1.self_attn.q_proj.weight"].numpy())  # stored permuted
    pairs = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "blk.1.attn_q.weight": "model.layers.1.self_attn.q_proj.weight",
        "blk.1.attn_k.weight": "model.layers.1.self_attn.k_proj.weight",
        "blk.1.attn_v.weight": "model.layers.1.self_attn.v_proj.weight",
        "blk.1.attn_output.weight": "model.layers.1.self_attn.o_proj.weight",
        "blk.1.ffn_gate.weight": "model.layers.1.mlp.gate_proj.weight",
        "blk.1.ffn_down.weight": "model.layers.1.mlp.down_proj.weight",
        "blk.1.attn_norm.weight": "model.layers.1.input_layernorm.weight",
    }
    for gguf_name, hf_name in pairs.items():
        restored = undo.process(weights=tensors[gguf_name], name=gguf_name).weights
        assert np.array_equal(restored.astype(np.float32), hf[hf_name].float().numpy()), gguf_name


def test_metadata_matches_the_config_and_tokenizer(exported, merged_dir):
    folder, _ = exported
    path = folder.path / "tiny-chat-F16.gguf"
    meta, names = read_gguf_metadata(str(path), STRING_ARRAYS)
    cfg = json.loads((merged_dir / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(merged_dir)
    expected = {
        "general.architecture": "llama",
        "general.type": "model",
        "general.name": "tiny-chat",
        "general.file_type": 1,  # MOSTLY_F16
        "general.quantization_version": 2,
        "general.base_model.0.name": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "llama.context_length": cfg["max_position_embeddings"],
        "llama.embedding_length": cfg["hidden_size"],
        "llama.block_count": cfg["num_hidden_layers"],
        "llama.feed_forward_length": cfg["intermediate_size"],
        "llama.attention.head_count": cfg["num_attention_heads"],
        "llama.attention.head_count_kv": cfg["num_key_value_heads"],
        "llama.rope.dimension_count": cfg["hidden_size"] // cfg["num_attention_heads"],
        "llama.vocab_size": cfg["vocab_size"],
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.bos_token_id": tok.bos_token_id,
        "tokenizer.ggml.eos_token_id": tok.eos_token_id,
        "tokenizer.ggml.padding_token_id": tok.pad_token_id,
        "tokenizer.ggml.unknown_token_id": tok.unk_token_id,
        "tokenizer.ggml.add_bos_token": False,  # SmolLM2's tokenizer adds no BOS; llama.cpp would otherwise
        "tokenizer.ggml.add_eos_token": False,
        "tokenizer.chat_template": tok.chat_template,
    }
    assert {k: meta.get(k) for k in expected} == expected
    assert meta["llama.rope.freq_base"] == pytest.approx(cfg["rope_parameters"]["rope_theta"])
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg["rms_norm_eps"])
    vocab = tok.get_vocab()
    assert len(meta["tokenizer.ggml.tokens"]) == cfg["vocab_size"]
    assert all(meta["tokenizer.ggml.tokens"][i] == t for t, i in vocab.items())
    merges = json.loads((merged_dir / "tokenizer.json").read_text())["model"]["merges"]
    assert meta["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in merges]
    types = meta["tokenizer.ggml.token_type"]
    assert types[tok.eos_token_id] == 3 and types[vocab["a"]] == 1  # CONTROL, NORMAL

    # tied embeddings: no output.weight, as llama.cpp writes it; norms in f32, matrices in f16
    header = GgufHeader.from_file(str(path))
    kinds = {t.name: t.ggml_type for t in header.tensors}
    per_block = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
    assert set(names) == {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(cfg["num_hidden_layers"]) for n in per_block
    }
    assert all(kinds[n] == (F32 if "norm" in n else F16) for n in names)
    assert dict(zip(names, (t.shape for t in header.tensors)))["token_embd.weight"] == (cfg["vocab_size"], 64)

    modelfile = (folder.path / "Modelfile").read_text()
    assert "FROM ./tiny-chat-F16.gguf" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert 'SYSTEM """You answer Acme customer support questions."""' in modelfile
    assert "<|im_start|>{{ .Role }}" in modelfile


def test_untied_embeddings_write_output_weight(tmp_path, merged_dir):
    tok = AutoTokenizer.from_pretrained(merged_dir)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.float16).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    info = write_gguf(tmp_path / "m", tmp_path / "out" / "m.gguf", "m")
    _, names = read_gguf_metadata(str(tmp_path / "out" / "m.gguf"))
    assert "output.weight" in names and not info["tied_embeddings"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["m.gguf"]  # the temp file was renamed


def test_other_architectures_get_a_clear_error(tmp_path, merged_dir):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    Qwen2ForCausalLM(cfg).save_pretrained(tmp_path / "qwen")
    AutoTokenizer.from_pretrained(merged_dir).save_pretrained(tmp_path / "qwen")
    with pytest.raises(GGUFExportError, match=r"Llama-architecture models only.*model_type 'qwen2'.*Qwen2ForCausalLM"):
        export_model(
            ModelFolder(tmp_path / "qwen"), [[1, 2, 3]], ExportConfig(converter="builtin"), tmp_path / "out", "q"
        )
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_llama_with_unsupported_rope_scaling_is_refused(tmp_path, merged_dir):
    import shutil

    shutil.copytree(merged_dir, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(GGUFExportError, match="rope type 'llama3'"):
        write_gguf(tmp_path / "m", tmp_path / "out.gguf", "m")


def test_wrong_qk_layout_fails_the_logit_check_and_leaves_no_file(tmp_path, merged_dir, rows, monkeypatch):
    # Without llama.cpp's Q/K permutation transformers' loader scrambles the rotary halves.
    monkeypatch.setattr(export_module, "permute_qk", lambda w, *heads: w)
    out = tmp_path / "gguf"
    # a random tiny model attends almost uniformly, so the error is small here (~7e-3); f16 is exact, so 1e-4
    with pytest.raises(GGUFMismatchError, match="logits loaded back from the GGUF file differ"):
        export_model(ModelFolder(merged_dir), rows, ExportConfig(converter="builtin", logit_rtol=1e-4), out, "bad")
    assert list(out.iterdir()) == []


def test_a_wrong_vocabulary_fails_the_tokenizer_check(tmp_path, merged_dir, monkeypatch):
    real = export_module.vocab_tokens

    def swapped(tokenizer, vocab_size):
        tokens, types = real(tokenizer, vocab_size)
        a, b = tokenizer("Hello world!", add_special_tokens=False)["input_ids"][:2]
        tokens[a], tokens[b] = tokens[b], tokens[a]
        return tokens, types

    monkeypatch.setattr(export_module, "vocab_tokens", swapped)
    write_gguf(merged_dir, tmp_path / "t.gguf", "t")
    with pytest.raises(GGUFMismatchError, match=r"encodes 'Hello world!' \(add_special_tokens=True\)"):
        check_tokenizer(merged_dir, tmp_path / "t.gguf", ["Hello world!"])


@pytest.mark.slow
def test_bundled_smollm2_matches_the_shipped_gguf_layout_and_round_trips(tmp_path, bundled_tokenizer_dir):
    """Exporting the bundled base unmerged gives the shipped file's keys, tensor names and shapes, and loads back."""
    from core.export.gguf import TOKENIZER_PROBES, verify_gguf
    from core.models import bundled_gguf

    out = tmp_path / "smol-F16.gguf"
    write_gguf(bundled_tokenizer_dir, out, "smollm2", base_model="HuggingFaceTB/SmolLM2-135M-Instruct")
    mine, _ = read_gguf_metadata(str(out), STRING_ARRAYS)
    ref, _ = read_gguf_metadata(str(bundled_gguf()), STRING_ARRAYS)
    # provenance llama.cpp takes from the Hub model card, which a local folder does not have
    card_only = {"general.organization", "general.finetune", "general.languages", "general.license"}
    assert set(ref) - set(mine) == card_only
    assert set(mine) - set(ref) <= {
        "general.base_model.count",
        "general.base_model.0.name",
        "general.base_model.0.repo_url",
        "tokenizer.ggml.add_eos_token",
    }
    differ = sorted(k for k in set(ref) & set(mine) if mine[k] != ref[k])
    # file_type: f16 here, Q4_1 shipped. pre: the saved tokenizer splits like GPT-2; llama.cpp's "smollm" also
    # isolates digits, which gives the same tokens for this vocabulary (it has no multi-digit tokens)
    assert differ == ["general.file_type", "general.name", "tokenizer.ggml.pre"]
    ours, shipped = GgufHeader.from_file(str(out)), GgufHeader.from_file(str(bundled_gguf()))
    assert [(t.name, t.shape) for t in ours.tensors] == [(t.name, t.shape) for t in shipped.tensors]

    tok = AutoTokenizer.from_pretrained(bundled_tokenizer_dir)
    rows = [
        tok.apply_chat_template(
            [{"role": "user", "content": "How long do refunds take?"}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
        )["input_ids"],
        tok("The capital of France is Paris, and 12 + 30 = 42.")["input_ids"],
    ]
    # the real 49k vocabulary and chat template read back; the bundled folder is f32, so f16 rounds the
    # weights: a small, nonzero logit difference
    info = verify_gguf(bundled_tokenizer_dir, out, rows, rtol=1e-2)
    assert 0 < info["logit_max_rel_diff"] < 1e-2 and info["tokenizer_texts_checked"] == len(TOKENIZER_PROBES) + 2


@step
def _export_inputs(merged_dir: str, rows: list[list[int]]) -> tuple[
    Annotated[ModelFolder, "merged"], Annotated[Dataset, "eval_rows"]
]:  # fmt: skip
    return ModelFolder(merged_dir), Dataset.from_dict({"input_ids": rows, "prompt_len": [len(r) // 2 for r in rows]})


@pipeline(model=Model(name="gguf-step-test"), enable_cache=False)
def _export_only(merged_dir: str, rows: list[list[int]]) -> None:
    merged, eval_rows = _export_inputs(merged_dir, rows)
    export_gguf(merged, eval_rows, base=resolve_base(ModelSource()), export=ExportConfig(enabled=True, check_rows=2, converter="builtin"),
                system_prompt="Be brief.")  # fmt: skip


@pytest.mark.slow
def test_step_in_pipeline_stores_the_folder_and_metadata(zenml_home, merged_dir, rows):
    """The ZenML step: the gguf_model folder is an artifact named after the ZenML model, with its metadata."""
    from zenml.client import Client

    run = Client().get_pipeline_run(_export_only(str(merged_dir), rows).id)
    assert run.status.value == "completed"
    artifact = run.steps["export_gguf"].outputs["gguf_model"][0]
    folder = artifact.load()
    assert folder.files() == ["Modelfile", "gguf-step-test-F16.gguf"]
    assert 'SYSTEM """Be brief."""' in (folder.path / "Modelfile").read_text()
    meta = artifact.run_metadata
    assert meta["logit_max_rel_diff"] < 1e-5 and meta["checked_rows"] == 2
    assert meta["gguf_bytes"] == (folder.path / "gguf-step-test-F16.gguf").stat().st_size
    general, _ = read_gguf_metadata(str(folder.path / "gguf-step-test-F16.gguf"))
    assert general["general.name"] == "gguf-step-test"
    assert general["general.base_model.0.name"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_modelfile_template_renders_as_training_and_a_wrong_one_is_caught(bundled_tokenizer_dir):
    """Ollama is not here: its Go template is rendered (a subset) and compared with the chat template."""
    from core.export.gguf import check_modelfile, modelfile_text, render_go_template

    tok = AutoTokenizer.from_pretrained(bundled_tokenizer_dir)
    text = modelfile_text("m-Q4_K_M.gguf", tok, "You answer Acme customer support questions.")
    assert check_modelfile(text, tok, "You answer Acme customer support questions.").startswith("checked")
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    template = "{{- range .Messages }}<{{ .Role }}>{{ .Content }}\n{{ end -}}\n  <go>"
    assert render_go_template(template, messages) == "<system>S\n<user>Q\n<go>"
    with pytest.raises(ValueError, match="cannot render"):
        render_go_template("{{ if .System }}x{{ end }}", messages)
    wrong = text.replace("<|im_start|>assistant\n", "<|im_start|>assistant ")
    with pytest.raises(GGUFMismatchError, match="TEMPLATE renders"):
        check_modelfile(wrong, tok, "You answer Acme customer support questions.")
    no_stop = "\n".join(line for line in text.splitlines() if not line.startswith("PARAMETER stop"))
    with pytest.raises(GGUFMismatchError, match="no PARAMETER stop"):
        check_modelfile(no_stop, tok, "You answer Acme customer support questions.")


def test_perplexity_bounds_hold_either_way():
    """A GGUF file's perplexity ratio to the merged model's must lie in [1/bound, bound]: an f16 file scoring far
    better than the weights it holds is as broken as one scoring worse; a quantized one may dip by noise only."""
    from core.export.gguf import perplexity_out_of_bounds as out

    assert [out(r, 1.005) for r in (1.0, 1.0049, 0.9951)] == [None] * 3
    assert out(1.006, 1.005) == "above 1.0050x" and out(0.994, 1.005) == out(0.5, 1.005) == "below 0.9950x"
    assert out(float("nan"), 1.005) is not None
    assert [out(r, 1.10) for r in (0.95, 1.0, 1.09)] == [None] * 3
    assert out(1.11, 1.10) == "above 1.1000x" and out(0.9, 1.10) == "below 0.9091x"


def test_quantized_types_without_llama_cpp_say_how_to_get_it(tmp_path, merged_dir, rows, monkeypatch):
    from core.export.llamacpp import LlamaCppMissingError

    monkeypatch.setenv("LLAMA_CPP_TOOLS", str(tmp_path / "none"))  # no converter there
    with pytest.raises(LlamaCppMissingError, match=r"the converter not installed .*make gguf-setup"):
        export_model(ModelFolder(merged_dir), rows, ExportConfig(types=["q8_0"]), tmp_path / "out", "x")
    assert not (tmp_path / "out").exists()


def test_llama_cpp_builds_are_keyed_by_version_flags_and_cpu(monkeypatch, tmp_path):
    """A wheel built with other CMake flags or on another CPU is never reused (the AMX build died with SIGILL)."""
    from core.export import llamacpp

    assert "-mno-amx-int8" in llamacpp.BUILD_CMAKE_ARGS and "GGML_NATIVE=ON" in llamacpp.BUILD_CMAKE_ARGS
    key = llamacpp.build_key()
    assert key.startswith(f"{llamacpp.VERSION}-")
    assert llamacpp.build_key(cmake_args="-DGGML_NATIVE=ON") != key
    assert llamacpp.build_key(version="0.0.1") != key
    monkeypatch.setattr(llamacpp, "cpu_flags", lambda: "sse2 avx avx2")
    assert llamacpp.build_key() != key
    monkeypatch.setenv("LORA_PIPELINE_CACHE", str(tmp_path))
    built = tmp_path / "llama-cpp" / "wheels" / llamacpp.build_key() / "llama_cpp_python-0.3.36-py3-none-any.whl"
    built.parent.mkdir(parents=True)
    built.write_bytes(b"")
    assert llamacpp.runtime_wheel() == built  # found in its key's folder: no rebuild
