"""GGUF export: the merged model as one GGUF file (f16) for llama.cpp and Ollama.

Runs after merge when `export.enabled` is true (see configs/default.yaml):

    zenml pipeline run pipelines.lora_pipeline -c configs/default.yaml   # with export.enabled: true

Writes what llama.cpp's convert_hf_to_gguf.py writes for a Llama model at `--outtype f16`: the hyper-
parameters under `llama.*`, the byte-level BPE tokenizer (tokens, token types, merges, special ids, BOS/EOS
flags, chat template) taken from the saved HF tokenizer, 2-D weights in f16 and 1-D norms in f32, Q and K
rows permuted into llama.cpp's rotary layout, and no `output.weight` when the embeddings are tied. The file
is then loaded back with transformers' GGUF loader: its logits on a few eval rows and its tokenizer's
encodings of a few texts must match the merged model's, or the step fails and no artifact is written.

The output folder holds the .gguf file and an Ollama `Modelfile`:

    ollama create my-model -f Modelfile && ollama run my-model
    llama-cli -m <name>-F16.gguf -cnv
"""

from __future__ import annotations

import json
import logging
import os
import re
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from core import models
from core.artifacts import ModelFolder
from core.config import ExportConfig, ModelSource
from core.tensors import batch_logits, max_relative_diff

logger = logging.getLogger(__name__)

ARCH = "llama"  # the only architecture this exporter writes
# Texts whose encodings must match between the HF tokenizer and the one transformers rebuilds from the
# file: whitespace runs, digits, punctuation, contractions, non-Latin scripts, emoji, special tokens.
TOKENIZER_PROBES = [
    "Hello world! How are you today?",
    "  two leading spaces,\ttabs\tand\n\nblank lines\n",
    "Order #12345 costs $1,299.99 (3.5% off) on 2024-06-01.",
    "I'm sure you'll see they've done it; don't worry.",
    "Ünïcödé — naïve café, 東京, Здравствуйте, 🙂👍",
    "<|im_start|>user\nWhat is the refund window?<|im_end|>\n<|im_start|>assistant\n",
    "def f(x):\n    return x ** 2  # square\n",
    "",
]


class GGUFExportError(ValueError):
    """The merged model cannot be written as GGUF (architecture, tokenizer or tensor not supported)."""


class GGUFMismatchError(RuntimeError):
    """The GGUF file, loaded back, does not reproduce the merged model."""


# ---------------------------------------------------------------------------------------------- checks


def check_supported(model_dir: Path) -> dict:
    """The model's config.json, after checking it is a Llama model this exporter writes faithfully."""
    cfg_file = model_dir / "config.json"
    if not cfg_file.is_file():
        raise GGUFExportError(f"{model_dir}: no config.json; is this a merged model folder?")
    cfg = json.loads(cfg_file.read_text())
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    if model_type != ARCH or (archs and archs != ["LlamaForCausalLM"]):
        raise GGUFExportError(
            f"{cfg_file}: GGUF export supports Llama-architecture models only (model_type 'llama', "
            f"LlamaForCausalLM); this model is model_type {model_type!r}, architectures {archs}"
        )
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    problems = []
    if rope_type != "default":
        problems.append(f"rope type {rope_type!r} (only 'default' round-trips through transformers' GGUF loader)")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        problems.append("attention/MLP bias terms")
    if cfg.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {cfg['hidden_act']!r} (llama.cpp's llama graph is SiLU-gated)")
    if problems:
        raise GGUFExportError(f"{cfg_file}: cannot export as GGUF: " + "; ".join(problems))
    return cfg


def _tokenizer_json(model_dir: Path) -> dict:
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise GGUFExportError(f"{model_dir}: no tokenizer.json (GGUF export needs a fast, byte-level BPE tokenizer)")
    tok = json.loads(path.read_text(encoding="utf-8"))
    model = tok.get("model") or {}
    if (
        model.get("type") != "BPE"
        or model.get("byte_fallback")
        or (tok.get("decoder") or {}).get("type") != "ByteLevel"
    ):
        raise GGUFExportError(
            f"{path}: GGUF export writes byte-level BPE tokenizers (tokenizer.ggml.model 'gpt2'); this one is "
            f"model {model.get('type')!r}, byte_fallback={model.get('byte_fallback')}, "
            f"decoder {(tok.get('decoder') or {}).get('type')!r}"
        )
    return tok


def pre_tokenizer_name(tok_json: dict, where: str = "tokenizer.json") -> str:
    """llama.cpp's `tokenizer.ggml.pre` for the way this tokenizer splits text before BPE.

    llama.cpp recognises a pre-tokenizer by name and applies its own regexes; an unknown name
    fails to load there, and a wrong one silently tokenizes differently. Only the shapes below are
    known to split text the same way on both sides.
    """
    pre = tok_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"  # GPT-2's regex, applied by ByteLevel itself
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # each digit on its own, then GPT-2's regex
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = (steps[0].get("pattern") or {}).get("Regex", "")
        if pattern.startswith("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"):
            return "llama-bpe"  # Llama 3's regex
    raise GGUFExportError(
        f"{where}: pre-tokenizer {kinds} has no llama.cpp equivalent known to this exporter "
        "(supported: GPT-2 ByteLevel, SmolLM digits + ByteLevel, Llama 3 split)"
    )


# ------------------------------------------------------------------------------------------ tokenizer


def _looks_special(token: str) -> bool:
    # llama.cpp's convert_hf_to_gguf.py marks these CONTROL even when the HF tokenizer does not.
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<｜") and token.endswith("｜>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def add_bos_eos(tokenizer) -> tuple[bool, bool]:
    """Whether the tokenizer adds BOS / EOS around plain text: measured, not read from flags."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    start = next((i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain), 0)
    prefix, suffix = full[:start], full[start + len(plain) :]
    bos = bool(prefix) and prefix[0] == tokenizer.bos_token_id
    eos = bool(suffix) and suffix[-1] == tokenizer.eos_token_id
    return bos, eos


def vocab_tokens(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens and llama.cpp token types by id, as convert_hf_to_gguf.py's get_vocab_base builds them."""
    from gguf import TokenType

    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    if reverse and max(reverse) >= vocab_size:
        raise GGUFExportError(f"tokenizer has token id {max(reverse)} but the model's vocab_size is {vocab_size}")
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")  # the embedding rows past the tokenizer's vocabulary
            types.append(int(TokenType.UNUSED))
            continue
        token = reverse[i]
        if token in added:
            # llama.cpp expects added tokens as the text they match: un-normalized ones round-trip through
            # the tokenizer (a no-op for ChatML markers), user-defined ones get real spaces
            if not decoder[i].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if decoder[i].special or _looks_special(token):
                types.append(int(TokenType.CONTROL))
            else:
                token = token.replace("\u2581", " ")
                types.append(int(TokenType.USER_DEFINED))
        else:
            types.append(int(TokenType.NORMAL))
        tokens.append(token)
    return tokens, types


def write_tokenizer(writer, model_dir: Path, tokenizer, vocab_size: int) -> dict:
    """The tokenizer.* keys. Returns a summary for the step's metadata."""
    from gguf import SpecialVocab

    tok_json = _tokenizer_json(model_dir)
    pre = pre_tokenizer_name(tok_json, str(model_dir / "tokenizer.json"))
    tokens, types = vocab_tokens(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    pre_tok = tok_json.get("pre_tokenizer") or {}
    byte_level = next((p for p in [pre_tok, *pre_tok.get("pretokenizers", [])] if p.get("type") == "ByteLevel"), {})
    writer.add_add_space_prefix(bool(byte_level.get("add_prefix_space", False)))
    # llama.cpp's own reader of merges, special token ids and the chat template (gguf-py).
    special = SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise GGUFExportError(f"{model_dir / 'tokenizer.json'}: no BPE merges")
    # ids as the loaded tokenizer has them (tokenizer_config.json may set a pad token config.json lacks)
    for typ in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{typ}_token_id", None)
        if tid is not None:
            special.special_token_ids[typ] = int(tid)
    # llama.cpp defaults to adding BOS for some vocabularies; state both flags as the HF tokenizer behaves
    bos, eos = add_bos_eos(tokenizer)
    special.add_special_token.update({"bos": bos, "eos": eos})
    if special.chat_template is None and getattr(tokenizer, "chat_template", None):
        special.chat_template = tokenizer.chat_template
    special.add_to_gguf(writer, quiet=True)
    return {
        "pre": pre,
        "tokens": len(tokens),
        "merges": len(special.merges),
        "special_ids": dict(special.special_token_ids),
        "add_bos": bos,
        "add_eos": eos,
        "chat_template": special.chat_template is not None,
    }


# ---------------------------------------------------------------------------------------------- tensors


def permute_qk(w: torch.Tensor, n_head: int, n_head_kv: int | None = None) -> torch.Tensor:
    """llama.cpp's LlamaModel.permute: HF's rotate-half Q/K rows into GGML's interleaved rotary layout.

    transformers' GGUF loader undoes it (LlamaTensorProcessor._reverse_permute_weights).
    """
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _weight_files(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise GGUFExportError(f"{model_dir}: no *.safetensors weights (merge saves safetensors)")
    return files


def plan_tensors(model_dir: Path, cfg: dict) -> list[tuple[str, str, Path, tuple[int, ...]]]:
    """(gguf name, HF name, file, shape) for every tensor to write, in the checkpoint's order as llama.cpp does."""
    from gguf import MODEL_ARCH, get_tensor_name_map
    from safetensors import safe_open

    name_map = get_tensor_name_map(MODEL_ARCH.LLAMA, cfg["num_hidden_layers"])
    tied = bool(cfg.get("tie_word_embeddings", False))
    plan, unknown = [], []
    for file in _weight_files(model_dir):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if key == "lm_head.weight" and tied:
                    continue  # llama.cpp omits output.weight when it is the embedding matrix
                if key.endswith("rotary_emb.inv_freq"):
                    continue  # recomputed from rope.freq_base
                gguf_name = name_map.get_name(key, try_suffixes=(".weight", ".bias"))
                if gguf_name is None:
                    unknown.append(key)
                    continue
                plan.append((gguf_name, key, file, tuple(f.get_slice(key).get_shape())))
    if unknown:
        raise GGUFExportError(f"{model_dir}: tensors with no llama GGUF name: {unknown[:5]}")
    names = [p[0] for p in plan]
    if "output.weight" not in names and not tied:
        raise GGUFExportError(f"{model_dir}: no lm_head.weight and tie_word_embeddings is false")
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise GGUFExportError(f"{model_dir}: tensors map to the same GGUF name: {sorted(dup)}")
    return plan


def _gguf_dtype(shape: tuple[int, ...], gguf_name: str) -> np.dtype:
    # llama.cpp at --outtype f16 keeps 1-D tensors (norms) in f32
    return np.dtype(np.float32) if len(shape) <= 1 or gguf_name.endswith("_norm.weight") else np.dtype(np.float16)


def _convert(t: torch.Tensor, gguf_name: str, hf_name: str, cfg: dict) -> np.ndarray:
    heads, kv_heads = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        t = permute_qk(t, heads, heads)
    elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        t = permute_qk(t, heads, kv_heads)
    dtype = _gguf_dtype(tuple(t.shape), gguf_name)
    out = t.to(torch.float32 if dtype == np.float32 else torch.float16)
    # bf16/f32 weights beyond f16's range would turn into inf (f16 weights cannot)
    if t.dtype != out.dtype and out.dtype == torch.float16 and out.isinf().any() and not t.isinf().any():
        raise GGUFExportError(f"{hf_name}: values outside float16's range (|x| > 65504); cannot write it as f16")
    return out.contiguous().numpy()


# ------------------------------------------------------------------------------------------------ write


def gguf_file_name(name: str, kind: str = "f16") -> str:
    """<name>-F16.gguf, <name>-Q8_0.gguf, <name>-Q4_K_M.gguf (llama.cpp's naming)."""
    from core.export.llamacpp import TYPES

    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"
    return f"{slug}-{TYPES[kind][1]}.gguf"


def write_gguf(
    model_dir: Path, out_file: Path, name: str, base_model: str | None = None, license: str | None = None
) -> dict:
    """Write `model_dir` (a merged HF Llama folder) as one f16 GGUF file. Atomic: a temp file renamed at the end."""
    import gguf
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    cfg = check_supported(model_dir)
    _tokenizer_json(model_dir)  # fail on an unsupported tokenizer before reading any weights
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    plan = plan_tensors(model_dir, cfg)
    n_params = sum(int(np.prod(shape)) for _, _, _, shape in plan)

    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(f".{out_file.name}.partial")
    writer = gguf.GGUFWriter(tmp, ARCH)
    try:
        _add_general(writer, name, n_params, base_model, license)
        _add_hyperparameters(writer, cfg)
        tok_info = write_tokenizer(writer, model_dir, tokenizer, cfg["vocab_size"])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _write_tensors(writer, plan, cfg)
        writer.close()
        os.replace(tmp, out_file)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return {
        "file": out_file.name,
        "gguf_bytes": out_file.stat().st_size,  # the materializer logs the whole folder's size_bytes
        "tensors": len(plan),
        "parameters": n_params,
        "tied_embeddings": bool(cfg.get("tie_word_embeddings", False)),
        "tokenizer": tok_info,
    }


def _add_general(writer, name: str, n_params: int, base_model: str | None, license: str | None) -> None:
    """GGUF's general.* keys: the model's name and size, its license and the base model it came from."""
    import gguf

    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_basename(name)
    writer.add_size_label(gguf.size_label(n_params, 0, 0, 0))
    if license:
        writer.add_license(license)
    if base_model:
        writer.add_base_model_count(1)
        writer.add_base_model_name(0, base_model)
        if re.fullmatch(r"[\w.-]+/[\w.-]+", base_model):
            writer.add_base_model_repo_url(0, f"https://huggingface.co/{base_model}")


def _add_hyperparameters(writer, cfg: dict) -> None:
    """The llama.* keys llama.cpp builds the model from: layers, widths, heads, RoPE, norm epsilon, vocabulary."""
    import gguf

    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or hidden // heads
    rope = cfg.get("rope_parameters") or {}
    rope_theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(cfg.get("num_key_value_heads") or heads)
    writer.add_rope_freq_base(float(rope_theta))
    writer.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_vocab_size(cfg["vocab_size"])
    writer.add_rope_dimension_count(head_dim)
    if head_dim != hidden // heads:  # llama.cpp reads the per-head width from these when it differs
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def _write_tensors(writer, plan: list[tuple[str, str, Path, tuple[int, ...]]], cfg: dict) -> None:
    """The header, the metadata and the tensor index, then every tensor converted, one in memory at a time."""
    from safetensors import safe_open

    for gguf_name, _, _, shape in plan:
        dtype = _gguf_dtype(shape, gguf_name)
        writer.add_tensor_info(gguf_name, shape, dtype, int(np.prod(shape)) * dtype.itemsize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    # one tensor in memory at a time: an 8B model never needs a second 16 GB copy
    with ExitStack() as stack:
        handles = {f: stack.enter_context(safe_open(str(f), framework="pt")) for f in {p[2] for p in plan}}
        for gguf_name, hf_name, file, _ in plan:
            writer.write_tensor_data(_convert(handles[file].get_tensor(hf_name), gguf_name, hf_name, cfg))


# ----------------------------------------------------------------------------------------------- verify


def _load_dtype_device() -> tuple[torch.dtype, dict]:
    # float32 on CPU (f16 matmuls there are slow and inexact); float16 on a GPU
    if torch.cuda.is_available():
        return torch.float16, {"device_map": {"": torch.cuda.current_device()}}
    return torch.float32, {}


def check_logits(model_dir: Path, gguf_path: Path, rows: list[list[int]], rtol: float, batch_size: int = 4) -> float:
    """max |GGUF - HF| logit on `rows`, as a fraction of max |HF logit|; GGUFMismatchError above `rtol`.

    The file is loaded by transformers' GGUF loader; one model in memory at a time.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, gguf_path = Path(model_dir), Path(gguf_path)
    if not rows:
        raise GGUFExportError("no eval rows to compare logits on")
    ref_tok = AutoTokenizer.from_pretrained(model_dir)
    pad_id = ref_tok.pad_token_id if ref_tok.pad_token_id is not None else ref_tok.eos_token_id
    batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    dtype, placement = _load_dtype_device()
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **placement).eval()
    expected = batch_logits(ref, batches, pad_id)
    del ref
    loaded = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=str(gguf_path), dtype=dtype, **placement
    ).eval()
    actual = batch_logits(loaded, batches, pad_id)
    del loaded
    rel = max_relative_diff(actual, expected)
    if not rel <= rtol:  # also catches NaN
        raise GGUFMismatchError(
            f"{gguf_path.name}: logits loaded back from the GGUF file differ from the merged model's by "
            f"{rel:.2e} of the logit range (export.logit_rtol={rtol}); not keeping the file"
        )
    return rel


def check_tokenizer(model_dir: Path, gguf_path: Path, texts: list[str]) -> int:
    """The tokenizer transformers rebuilds from the file must encode `texts` exactly as the HF one does
    (with and without special tokens) and carry the same chat template. Returns the number of texts."""
    from transformers import AutoTokenizer

    model_dir, gguf_path = Path(model_dir), Path(gguf_path)
    ref_tok = AutoTokenizer.from_pretrained(model_dir)
    gguf_tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=str(gguf_path))
    for text in texts:
        for special in (True, False):
            want = ref_tok(text, add_special_tokens=special)["input_ids"]
            got = gguf_tok(text, add_special_tokens=special)["input_ids"]
            if want != got:
                raise GGUFMismatchError(
                    f"{gguf_path.name}: the tokenizer read back from the file encodes {text[:60]!r} "
                    f"(add_special_tokens={special}) as {got[:12]}... instead of {want[:12]}..."
                )
    if (ref_tok.chat_template or None) != (gguf_tok.chat_template or None):
        raise GGUFMismatchError(f"{gguf_path.name}: the chat template read back differs from {model_dir}'s")
    return len(texts)


def verify_gguf(model_dir: Path, gguf_path: Path, rows: list[list[int]], rtol: float) -> dict:
    """Logits on `rows`, then the tokenizer on TOKENIZER_PROBES and the decoded rows."""
    from transformers import AutoTokenizer

    rel = check_logits(model_dir, gguf_path, rows, rtol)
    decoded = [AutoTokenizer.from_pretrained(model_dir).decode(r) for r in rows]
    texts = check_tokenizer(model_dir, gguf_path, TOKENIZER_PROBES + decoded)
    return {
        "logit_max_rel_diff": rel,
        "checked_rows": len(rows),
        "checked_tokens": sum(len(r) for r in rows),
        "tokenizer_texts_checked": texts,
    }


# -------------------------------------------------------------------------------------------- Modelfile


def _quote(text: str) -> str:
    return '"""' + text.replace('"""', '\\"\\"\\"') + '"""'


def default_system_prompt(tokenizer) -> str | None:
    """The system message a ChatML chat template adds by itself when a conversation has none (SmolLM2's: "You are
    a helpful AI assistant named SmolLM, ..."): training saw it, so Ollama must send it too."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if "<|im_start|>" not in template:
        return None
    text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True, tokenize=False)
    head = "<|im_start|>system\n"
    return text[len(head) : text.index("<|im_end|>")] if text.startswith(head) else None


def modelfile_text(gguf_name: str, tokenizer, system_prompt: str | None = None) -> str:
    """A short Ollama Modelfile for the file next to it."""
    lines = [
        "# ollama create <name> -f Modelfile && ollama run <name>",
        f"FROM ./{gguf_name}",
    ]
    template = getattr(tokenizer, "chat_template", None) or ""
    if "<|im_start|>" in template:
        # ChatML, as the model was trained; Ollama's own chatml template
        lines.append(
            'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
            '{{ end }}<|im_start|>assistant\n"""'
        )
    else:
        lines.append("# TEMPLATE: Ollama derives it from tokenizer.chat_template in the GGUF file")
    system_prompt = system_prompt or default_system_prompt(tokenizer)
    if system_prompt:
        lines.append(f"SYSTEM {_quote(system_prompt)}")
    if tokenizer.eos_token:
        lines.append(f"PARAMETER stop {json.dumps(tokenizer.eos_token)}")
    return "\n".join(lines) + "\n"


_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)


def render_go_template(template: str, messages: list[dict]) -> str:
    """Render the subset of Go's text/template the Modelfile's TEMPLATE uses, as Ollama would: `range .Messages`
    ... `end`, `.Role`, `.Content`, and the `{{-` / `-}}` whitespace trims. Anything else is a ValueError."""
    parts: list = []  # text pieces and (action,) tuples, trims applied
    pos = 0
    for m in _ACTION.finditer(template):
        text = template[pos : m.start()]
        if m.group(1):
            text = text.rstrip()
        if parts and isinstance(parts[-1], tuple) and parts[-1][1]:
            text = text.lstrip()
        parts.append(text)
        parts.append((m.group(2), bool(m.group(3))))
        pos = m.end()
    tail = template[pos:]
    if parts and isinstance(parts[-1], tuple) and parts[-1][1]:
        tail = tail.lstrip()
    parts.append(tail)

    def run(items: list, message: dict | None) -> str:
        out, i = [], 0
        while i < len(items):
            item = items[i]
            if isinstance(item, str):
                out.append(item)
            elif item[0] == "range .Messages":
                depth, j = 1, i + 1
                while depth:
                    if isinstance(items[j], tuple):
                        depth += items[j][0].startswith("range ") - (items[j][0] == "end")
                    j += 1
                out.extend(run(items[i + 1 : j - 1], m) for m in messages)
                i = j
                continue
            elif item[0] in (".Role", ".Content") and message is not None:
                out.append(message[item[0][1:].lower()])
            else:
                raise ValueError(f"the Modelfile check cannot render {{{{ {item[0]} }}}}")
            i += 1
        return "".join(out)

    return run(parts, None)


def check_modelfile(text: str, tokenizer, system_prompt: str | None) -> str:
    """The Modelfile's TEMPLATE, SYSTEM and stop must give the prompts training gave; GGUFMismatchError if not.

    Ollama is not available to ask, so its template is rendered here (render_go_template) for a one-turn and a
    two-turn conversation and compared with the tokenizer's chat template, which training used; the end-of-turn
    the chat template writes after an answer must be a stop string."""
    found = re.search(r'^TEMPLATE """(.*?)"""', text, re.S | re.M)
    if not found:
        return "none: Ollama reads tokenizer.chat_template from the GGUF file"
    system_prompt = system_prompt or default_system_prompt(tokenizer)
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    one = [*system, {"role": "user", "content": "What is the refund window?"}]
    two = [*one, {"role": "assistant", "content": "30 days."}, {"role": "user", "content": "And for sale items?"}]
    for conversation in (one, two):
        want = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        got = render_go_template(found.group(1), conversation)
        if got != want:
            raise GGUFMismatchError(
                f"the Modelfile's TEMPLATE renders {got!r} where training's template gives {want!r}"
            )
    full = tokenizer.apply_chat_template([*one, {"role": "assistant", "content": "30 days."}], tokenize=False)
    after = full.split("30 days.", 1)[1]
    stops = [json.loads(v) for v in re.findall(r"^PARAMETER stop (.+)$", text, re.M)]
    if not any(after.startswith(s) for s in stops):
        raise GGUFMismatchError(
            f"no PARAMETER stop in the Modelfile ends an answer: the template follows one with {after[:20]!r}"
        )
    return "checked: renders as training's chat template; stops at the end of an answer"


# ------------------------------------------------------------------------------------- llama.cpp's path


def hf_greedy_ids(model, prompts: list[list[int]], max_new_tokens: int, eos_ids: set[int]) -> list[list[int]]:
    """transformers' greedy continuation of each prompt (one at a time: no padding), end-of-turn token included."""
    out = []
    with torch.inference_mode():
        for ids in prompts:
            gen = model.generate(
                input_ids=torch.tensor([ids], device=model.device),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=model.device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=sorted(eos_ids),
                pad_token_id=sorted(eos_ids)[0],
            )
            out.append(gen[0, len(ids) :].tolist())
    return out


def perplexity_out_of_bounds(ratio: float, bound: float) -> str | None:
    """Where a GGUF file's perplexity ratio to the merged model's falls outside [1/bound, bound] ("above 1.0050x",
    "below 0.9950x"); None within. Both ways: f16 holds the merged weights, so it must score as they do; a
    quantized file mostly scores worse (up to `bound`) and may dip below by as much noise, not more. A file far
    below its source is broken as surely as one far above (a wrong tensor, a perplexity measured wrongly)."""
    if ratio > bound:
        return f"above {bound:.4f}x"
    if not ratio >= 1 / bound:  # NaN too
        return f"below {1 / bound:.4f}x"
    return None


def export_llamacpp(
    model_dir: Path, prompts: list[list[int]], rows: list[list[int]], cfg: ExportConfig, out_dir: Path, name: str
) -> tuple[dict[str, Path], dict]:
    """llama.cpp converts (f16) and quantizes; llama.cpp loads each file, which must answer the eval prompts like
    the merged model (f16: token for token) and stay within cfg.max_perplexity_ratio of its perplexity on `rows`,
    either way (perplexity_out_of_bounds).
    Returns ({type: file}, info). On any failure every file written here is deleted."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    try:
        files = _convert_and_quantize(model_dir, out_dir, name, cfg.types, written)
        reference = _merged_reference(model_dir, prompts, rows, cfg.answer_tokens)
        info: dict = {"converter": "llama.cpp convert_hf_to_gguf.py", "merged_perplexity": round(reference.ppl, 4)}
        failures = []
        for kind in ["f16", *[k for k in cfg.types if k != "f16"]]:
            info[kind] = _check_in_llamacpp(kind, files[kind], prompts, rows, cfg, reference, failures)
        if failures:
            raise GGUFMismatchError("GGUF files checked in llama.cpp; not keeping them: " + "; ".join(failures))
        if "f16" not in cfg.types:  # made only to quantize from
            files["f16"].unlink()
            del files["f16"]
        info["types"] = list(cfg.types)
        return files, info
    except BaseException:
        for f in written:
            f.unlink(missing_ok=True)
        raise


def _convert_and_quantize(model_dir: Path, out_dir: Path, name: str, types, written: list[Path]) -> dict[str, Path]:
    """llama.cpp's f16 conversion, then each quantized type from it; every file is noted in `written` at once."""
    from core.cpus import usable_cpus
    from core.export import llamacpp

    f16 = llamacpp.convert(model_dir, out_dir / gguf_file_name(name, "f16"), name)
    written.append(f16)
    files = {"f16": f16}
    for kind in types:
        if kind != "f16":
            files[kind] = llamacpp.quantize(f16, out_dir / gguf_file_name(name, kind), kind, usable_cpus())
            written.append(files[kind])
    return files


@dataclass
class _Reference:
    """What the merged model in transformers does: the answers and perplexity each GGUF file is held to."""

    tokenizer: object
    eos_ids: set[int]
    answers: list[list[int]]  # greedy answer ids per eval prompt
    ppl: float  # perplexity on the eval rows


def _merged_reference(
    model_dir: Path, prompts: list[list[int]], rows: list[list[int]], answer_tokens: int
) -> _Reference:
    """The merged model's greedy answers and perplexity in transformers, the model dropped afterwards."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from core.export import llamacpp

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dtype, placement = _load_dtype_device()
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **placement).eval()
    eos_ids = models.end_of_turn_ids(ref, tokenizer)
    want = hf_greedy_ids(ref, prompts, answer_tokens, eos_ids)
    ref_ppl = llamacpp.perplexity_hf(ref, rows)
    del ref
    return _Reference(tokenizer, eos_ids, want, ref_ppl)


def _check_in_llamacpp(
    kind: str,
    file: Path,
    prompts: list[list[int]],
    rows: list[list[int]],
    cfg: ExportConfig,
    reference: _Reference,
    failures: list[str],
) -> dict:
    """One GGUF file loaded in llama.cpp against the reference: its record; what fails is appended to `failures`."""
    from core.cpus import usable_cpus
    from core.export import llamacpp

    n_ctx = max(len(r) for r in rows + [p + [0] * cfg.answer_tokens for p in prompts]) + 8
    llm = llamacpp.load(file, n_ctx, threads=usable_cpus())
    got = [llamacpp.greedy_ids(llm, p, cfg.answer_tokens, reference.eos_ids) for p in prompts]
    ppl = llamacpp.perplexity_llama(llm, rows)
    del llm
    want, ref_ppl = reference.answers, reference.ppl
    same = sum(g == w for g, w in zip(got, want))
    ratio = ppl / ref_ppl
    bound = cfg.max_perplexity_ratio.get(kind)
    logger.info("GGUF %s: perplexity %.4f (%.4fx the merged model's), %d/%d greedy answers the same",
                kind, ppl, ratio, same, len(prompts))  # fmt: skip
    if bound is not None and (side := perplexity_out_of_bounds(ratio, bound)):
        failures.append(f"{kind}: perplexity {ppl:.4f} is {ratio:.4f}x the merged model's {ref_ppl:.4f}, "
                        f"{side} (export.max_perplexity_ratio.{kind}={bound}, either way)")  # fmt: skip
    if kind == "f16" and same != len(prompts):
        bad = next(i for i, (g, w) in enumerate(zip(got, want)) if g != w)
        tokenizer = reference.tokenizer
        failures.append(
            f"f16: llama.cpp's greedy answer to eval prompt {bad} differs from the merged model's: "
            f"{tokenizer.decode(got[bad])!r} vs {tokenizer.decode(want[bad])!r}"
        )
    return {
        "file": file.name,
        "bytes": file.stat().st_size,
        "perplexity": round(ppl, 4),
        "perplexity_ratio": round(ratio, 4),
        "max_perplexity_ratio": bound,
        "same_greedy_answers": f"{same}/{len(prompts)}",
    }


# ------------------------------------------------------------------------------------------------ whole


def export_model(
    merged: ModelFolder,
    rows: list[list[int]],
    cfg: ExportConfig,
    out_dir: Path,
    name: str,
    base_model: str | None = None,
    system_prompt: str | None = None,
    prompts: list[list[int]] | None = None,
) -> tuple[ModelFolder, dict]:
    """Write and verify the GGUF file(s), add the Modelfile; a file that fails verification is deleted.

    `rows`: eval rows (prompt + answer ids) for logits / perplexity; `prompts`: eval prompts for greedy answers.
    llama.cpp's converter when cfg.converter allows and it is installed (core/export/llamacpp.py), else the built-in
    Llama-only f16 writer above, verified through transformers' GGUF loader.
    """
    from transformers import AutoTokenizer

    from core.export import llamacpp

    out_dir = Path(out_dir)
    if cfg.converter == "llama.cpp" or cfg.types != ["f16"]:
        llamacpp.require()  # before any work: quantized types exist only through llama.cpp
    if cfg.converter != "builtin" and llamacpp.available():
        files, info = export_llamacpp(
            merged.path, (prompts or rows)[: cfg.check_rows], rows[: cfg.perplexity_rows], cfg, out_dir, name
        )
    else:
        gguf_path = out_dir / gguf_file_name(name)
        info = write_gguf(merged.path, gguf_path, name, base_model=base_model, license=cfg.license)
        info["converter"] = "built-in (llama.cpp not installed)" if cfg.converter == "auto" else "built-in"
        try:
            info.update(verify_gguf(merged.path, gguf_path, rows[: cfg.check_rows], cfg.logit_rtol))
        except BaseException:
            gguf_path.unlink(missing_ok=True)
            raise
        files = {"f16": gguf_path}
    tokenizer = AutoTokenizer.from_pretrained(merged.path)
    text = modelfile_text(files[cfg.types[0]].name, tokenizer, system_prompt)
    info["modelfile_template"] = check_modelfile(text, tokenizer, system_prompt)
    (out_dir / "Modelfile").write_text(text)
    return ModelFolder(out_dir), info


def default_name(model: ModelSource) -> str:
    """general.name when export.name is unset and the run has no ZenML model: '<base>-finetuned'."""
    return f"{Path(models.display_name(model).rstrip('/')).name}-finetuned"
