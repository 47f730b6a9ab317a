import torch

from core.config import ModelSource, QuantConfig
from core.models import ModelSourceError, bundled_model_dir, compute_dtype, load_base, model_identity, resolve_model


def test_bundled_model_is_converted_once_and_reused(bundled_tokenizer_dir):
    again = bundled_model_dir()
    assert again == bundled_tokenizer_dir
    assert (again / "model.safetensors").exists() and (again / "tokenizer.json").exists()
    # the GGUF quantization_config must be gone, or a BitsAndBytesConfig load would fail
    assert "quantization_config" not in (again / "config.json").read_text()


def test_missing_local_folder_is_named(tmp_path):
    missing = tmp_path / "no-such-model"
    try:
        resolve_model(ModelSource(source="local", name=str(missing)))
    except ModelSourceError as err:
        assert str(missing) in str(err)
    else:
        raise AssertionError("expected ModelSourceError")
    (tmp_path / "not-a-model").mkdir()
    try:
        resolve_model(ModelSource(source="local", name=str(tmp_path / "not-a-model")))
    except ModelSourceError as err:
        assert "config.json" in str(err)
    else:
        raise AssertionError("expected ModelSourceError")


def test_cpu_picks_fp32():
    if not torch.cuda.is_available():
        assert compute_dtype("auto") == torch.float32
    assert compute_dtype("bfloat16") == torch.bfloat16


def test_4bit_load_gives_bitsandbytes_layers(tiny_source):
    import bitsandbytes as bnb

    model = load_base(tiny_source, QuantConfig())
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit)
    assert q_proj.weight.quant_state.quant_type == "nf4"
    assert q_proj.weight.quant_state.nested  # double quantization
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)  # the head stays in full precision


def test_identity_changes_with_local_weights(tiny_model_dir, tmp_path):
    import shutil

    copy = tmp_path / "m"
    shutil.copytree(tiny_model_dir, copy)
    before = model_identity(ModelSource(source="local", name=str(copy)))
    (copy / "config.json").write_text((copy / "config.json").read_text().replace('"hidden_act"', '"hidden_act" '))
    assert model_identity(ModelSource(source="local", name=str(copy))) != before
