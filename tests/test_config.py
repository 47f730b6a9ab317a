from pathlib import Path

import pytest
import yaml

from core.config import ConfigError, load_config, validate_config

# Training run configs; configs/serve.yaml configures the serving deployment (tests/serving/test_serve.py checks it).
CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml") if p.name != "serve.yaml")


def test_there_are_configs():
    names = {p.name for p in CONFIGS}
    assert {"default.yaml", "llama3_8b_qlora.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_validates_and_documents_its_command(path):
    cfg = load_config(path)
    assert cfg.lora.r >= 1
    first_lines = path.read_text().splitlines()[:6]
    assert any(f"-c configs/{path.name}" in line for line in first_lines if line.startswith("#")), (
        f"{path.name} must start with a comment giving the exact command"
    )


def test_every_problem_is_reported_with_its_key_path(tmp_path):
    bad = {
        "parameters": {
            "config": {
                "data": {"path": "x.jsonl", "format": "instruction", "columns": {"messages": "m"}},
                "lora": {"r": 0, "dropout": 1.5},
                "train": {"learning_rate": -1, "micro_batch_sise": 4},
                "push": {"mode": "hub"},
            }
        }
    }
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError) as err:
        load_config(f)
    msg = str(err.value)
    assert str(f) in msg
    for key in (
        "parameters.config.lora.r",
        "parameters.config.lora.dropout",
        "parameters.config.train.learning_rate",
        "parameters.config.train.micro_batch_sise",  # typo: unknown keys are errors
        "parameters.config.data",  # 'messages' is not an instruction-format column
        "parameters.config.push",  # hub mode needs a repo id
    ):
        assert key in msg, key
    assert "6 problem(s)" in msg


def test_missing_block_and_file(tmp_path):
    (tmp_path / "empty.yaml").write_text("enable_cache: true\n")
    with pytest.raises(ConfigError, match="missing `parameters.config`"):
        load_config(tmp_path / "empty.yaml")
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")


def test_defaults_fill_in():
    cfg = validate_config({"data": {"path": "d.jsonl"}})
    assert cfg.model.source == "bundled" and cfg.quant.quant_type == "nf4" and cfg.push.mode == "dry_run"


# configs/container.yaml is the default run on the container stack (ZenML run configs have no include): its model,
# data and recipe must stay the default's, or `make stack-run` quietly shows another model than `make run`.
SAME_AS_DEFAULT = {"container.yaml": ["model", "data", "validation", "prompt", "quant", "lora", "merge", "push"]}


@pytest.mark.parametrize("name", sorted(SAME_AS_DEFAULT))
def test_default_variants_keep_the_default_recipe(name):
    configs = Path(__file__).resolve().parents[1] / "configs"

    def blocks(path):
        return yaml.safe_load(path.read_text())["parameters"]["config"]

    default, variant = blocks(configs / "default.yaml"), blocks(configs / name)
    drifted = [key for key in SAME_AS_DEFAULT[name] if variant.get(key) != default.get(key)]
    assert not drifted, f"configs/{name} no longer matches configs/default.yaml in: {', '.join(drifted)}"
