"""configs/preference.yaml through the `zenml` CLI: SFT, then the preference stage, evaluate with held-out pairs, merge,
push, promote. As shipped except for the tiny model, a few steps and a task it learns in them (the toy SFT task,
and pairs whose chosen answer states the item's code and whose rejected one invents a fee); dpo as shipped, and
kto on the same pairs (each a desirable and an undesirable row).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT, instruction_rows
from support.cli_run import run_config
from test_shipped_configs import toy_data

pytestmark = [pytest.mark.slow, pytest.mark.integration]  # two CLI runs, ~3 min: make test-integration


def toy_pairs(root: Path, train: int = 32, held_out: int = 24) -> dict[str, str]:
    """Pairs on the toy task's prompts: chosen is its answer ("The code for item 7 is 49."), rejected the same
    sentence about a made-up fee ("The fee for item 7 is 49."): one token apart, so length decides nothing."""
    rows = instruction_rows(train + held_out, 300)
    pairs = [
        {"prompt": r["instruction"], "chosen": r["output"], "rejected": r["output"].replace("code", "fee")}
        for r in rows
    ]
    out = {}
    for key, part in (("path", pairs[:train]), ("eval_path", pairs[train:])):
        path = root / f"pairs-{key}.jsonl"
        path.write_text("".join(json.dumps(p) + "\n" for p in part))
        out[key] = str(path)
    return out


def tiny_preference_config(root: Path, tiny_model_dir: Path, method: str) -> Path:
    doc = yaml.safe_load((REPO_ROOT / "configs" / "preference.yaml").read_text())
    doc["model"]["name"] = f"preference-{method}"
    config = doc["parameters"]["config"]
    config["model"] = {"source": "local", "name": str(tiny_model_dir)}
    toy_data(config["data"], root, "data", offset=300)
    config["train"].update(
        num_epochs=2, learning_rate=1e-2, micro_batch_size=4, tokens_per_micro_batch=None, save_every=100,
        checkpoint_dir=str(root / "ckpt"), method=method,
    )  # fmt: skip
    config["train"]["replay"]["answers"] = "data"  # a random tiny model never ends an answer: no own rehearsal
    config["train"]["preference"]["data"].update(toy_pairs(root))
    config["train"]["preference"].update(learning_rate=5e-3, num_epochs=2)
    config["evaluate"].update(num_generate=2, max_new_tokens=4, general_max_new_tokens=4)
    config["evaluate"]["gate"]["min_loss_improvement"] = 0.01  # the tiny model's held-out loss falls a few %
    # The random tiny model's logits span ~2 units, so fp16 rounding in its merge is a larger share of them than of a
    # trained model's: after kto its merged logits measured 2.4% of that span off base+adapter (0.4% after dpo;
    # 8.5e-7 in fp32, so the merge itself is right).
    config["merge"]["logit_rtol"] = 0.05
    path = root / "preference.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_preference_config_runs_sft_then_the_preference_stage(method, zenml_home, tmp_path, tiny_model_dir):
    from zenml.client import Client

    config = tiny_preference_config(tmp_path, tiny_model_dir, method)
    done = run_config(config)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = Client().get_pipeline("lora_pipeline").last_run
    for name in ("train_sft", "format_preference", "train_preference", "evaluate", "merge", "push", "promote"):
        assert run.steps[name].status.value == "completed", name
    # the preference stage continued the SFT stage's adapter, and evaluate scored the same start adapter
    sft_adapter = run.steps["train_sft"].outputs["sft_adapter"][0]
    assert run.steps["train_preference"].inputs["start_adapter"][0].id == sft_adapter.id
    assert run.steps["evaluate"].inputs["start_adapter"][0].id == sft_adapter.id

    report = run.steps["evaluate"].outputs["eval_report"][0].load()
    pref = report.preference
    assert pref is not None and pref.rows == 24 and pref.start_name == "SFT adapter"
    # the stage ranks the item's code above the made-up fee more often than the base, no less often than SFT did,
    # and by a wider reward margin than SFT's
    assert pref.tuned.accuracy > pref.base.accuracy and pref.tuned.accuracy >= pref.start.accuracy, pref
    assert pref.tuned.reward_margin > pref.start.reward_margin > 0, pref
    assert report.gate_passed, report.gate_messages
    assert any(m.startswith("preference accuracy") and m.endswith("ok") for m in report.gate_messages)

    metrics = run.steps["train_preference"].outputs["train_metrics"][0].load()
    assert metrics.method == method and metrics.loss_curve[-1][1] < metrics.loss_curve[0][1]

    (version,) = Client().list_model_versions(model=f"preference-{method}", sort_by="desc:number", size=1).items
    assert version.stage == "staging"
    meta = version.run_metadata
    assert meta["training"]["method"] == method and meta["sft_training"]["steps"] > 0
    assert meta["evaluation"]["preference"]["tuned"]["accuracy"] == pref.tuned.accuracy
    bundle = run.steps["push"].outputs["upload_bundle"][0].load()
    card = (bundle.path / "README.md").read_text()
    assert f"supervised fine-tuning, then {method.upper()} on preference data" in card
    assert "Preference accuracy on 24 held-out pairs" in card
