"""GGUF made by llama.cpp's own converter and quantizer, and checked in llama.cpp itself (core/export/llamacpp.py).

Needs `make gguf-setup` (llama-cpp-python and the converter); skipped with that reason without it. The model is
conftest's tiny Llama on SmolLM2's real tokenizer (llama.cpp's converter knows its pre-tokenizer), saved in f16
the way merge saves a merged model.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from core.artifacts import ModelFolder
from core.config import ExportConfig
from core.export import llamacpp
from core.export.gguf import GGUFMismatchError, export_model

pytestmark = [
    pytest.mark.gguf,
    pytest.mark.skipif(not llamacpp.available(), reason="llama.cpp not installed: make gguf-setup"),
]
SYSTEM = "You answer toy questions."


@pytest.fixture(scope="module")
def merged(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("merged-f16")
    LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float16).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def eval_rows(merged):
    """(prompts, full rows): chat-rendered questions, and the same with an answer."""
    from conftest import qa_rows

    tok = AutoTokenizer.from_pretrained(merged)
    prompts, rows = [], []
    for conv in qa_rows(6)["messages"]:
        conv = [{"role": "system", "content": SYSTEM}, *conv]
        prompts.append(
            tok.apply_chat_template(conv[:-1], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        )
        rows.append(tok.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"])
    return prompts, rows


def test_every_type_is_made_and_checked_by_llama_cpp(tmp_path, merged, eval_rows):
    from llama_cpp import Llama

    prompts, rows = eval_rows
    cfg = ExportConfig(types=["q4_k_m", "q8_0", "f16"], check_rows=4, perplexity_rows=6, answer_tokens=12)
    folder, info = export_model(ModelFolder(merged), rows, cfg, tmp_path / "gguf", "tiny", system_prompt=SYSTEM,
                                prompts=prompts)  # fmt: skip
    assert folder.files() == ["Modelfile", "tiny-F16.gguf", "tiny-Q4_K_M.gguf", "tiny-Q8_0.gguf"]
    assert info["converter"].startswith("llama.cpp") and info["types"] == ["q4_k_m", "q8_0", "f16"]
    assert info["f16"]["same_greedy_answers"] == "4/4"  # llama.cpp answers as transformers does, token for token
    for kind, bound in (("f16", 1.005), ("q8_0", 1.01), ("q4_k_m", 1.10)):
        assert info[kind]["max_perplexity_ratio"] == bound and 1 / bound <= info[kind]["perplexity_ratio"] <= bound
        assert info[kind]["perplexity"] == pytest.approx(
            info["merged_perplexity"] * info[kind]["perplexity_ratio"], rel=1e-3
        )
    sizes = {kind: info[kind]["bytes"] for kind in ("f16", "q8_0", "q4_k_m")}
    assert sizes["q4_k_m"] < sizes["q8_0"] < sizes["f16"]
    modelfile = (folder.path / "Modelfile").read_text()
    assert "FROM ./tiny-Q4_K_M.gguf" in modelfile and info["modelfile_template"].startswith("checked")
    # what llama.cpp reads from the quantized file
    llm = Llama(model_path=str(folder.path / "tiny-Q4_K_M.gguf"), n_ctx=64, verbose=False)
    assert llm.metadata["general.name"] == "tiny" and llm.metadata["general.file_type"] == "15"  # MOSTLY_Q4_K_M
    assert (
        llm.tokenize(b"Hello world", add_bos=False) == AutoTokenizer.from_pretrained(merged)("Hello world")["input_ids"]
    )


def test_a_file_outside_its_perplexity_bounds_either_way_is_refused_and_nothing_is_left(
    tmp_path, merged, eval_rows, monkeypatch
):
    """llama.cpp's perplexity of each file, scaled as a broken file or measurement would: the f16 file (made to
    quantize from, and checked too) scores half the merged model's, far too well; the q4_k_m file 3x, far too
    badly. Both are refused, each saying which way."""
    prompts, rows = eval_rows
    measured, scale = {}, {"tiny-F16.gguf": 0.5, "tiny-Q4_K_M.gguf": 3.0}
    real = llamacpp.perplexity_llama

    def scaled(llm, rows):
        name = Path(llm.model_path).name
        measured[name] = real(llm, rows)
        return measured[name] * scale[name]

    monkeypatch.setattr(llamacpp, "perplexity_llama", scaled)
    cfg = ExportConfig(types=["q4_k_m"], check_rows=2, perplexity_rows=3)
    with pytest.raises(GGUFMismatchError) as failed:
        export_model(ModelFolder(merged), rows, cfg, tmp_path / "gguf", "tiny", prompts=prompts)
    assert set(measured) == set(scale)
    message = str(failed.value)
    assert re.search(r"f16: perplexity [\d.]+ is 0\.5\d*x the merged model's [\d.]+, below 0\.9950x "
                     r"\(export\.max_perplexity_ratio\.f16=1\.005, either way\)", message), message  # fmt: skip
    assert re.search(r"q4_k_m: perplexity [\d.]+ is 3\.0\d*x the merged model's [\d.]+, above 1\.1000x "
                     r"\(export\.max_perplexity_ratio\.q4_k_m=1\.1, either way\)", message), message  # fmt: skip
    assert list((tmp_path / "gguf").glob("*.gguf")) == []


def test_only_quantized_types_keep_no_f16(tmp_path, merged, eval_rows):
    prompts, rows = eval_rows
    cfg = ExportConfig(types=["q8_0"], check_rows=2, perplexity_rows=3)
    folder, info = export_model(ModelFolder(merged), rows, cfg, tmp_path / "gguf", "tiny", prompts=prompts)
    assert folder.files() == ["Modelfile", "tiny-Q8_0.gguf"]
    assert info["f16"]["same_greedy_answers"] == "2/2"  # the f16 it quantized from was checked, then removed
