"""Training throughput: the tutorial QLoRA recipe and this project's train step, side by side, on this machine.

    python benchmarks/train_throughput.py --preset cpu --json bench-train-cpu.json     # SmolLM2-135M, fp32 on CPU
    python benchmarks/train_throughput.py --preset smoke                               # tiny model: every row runs
    python benchmarks/train_throughput.py --preset gpu-8b --json bench-train-8b.json   # CUDA: Llama-3.1-8B shape
    python benchmarks/train_throughput.py --preset cpu --rows tutorial,ours --steps 2  # a quick check

Rows, each in a fresh subprocess (so peak memory is that row's own), on identical seeded synthetic data:
- `tutorial`: the seeds' recipe. trl SFTTrainer + peft LoRA r=16, alpha=32, dropout 0.05 on q,k,v,o,gate,up,down,
  bitsandbytes nf4 with double quant, paged_adamw_8bit on CUDA (adamw_torch on CPU), padded batches of rows
  (4 x grad accum 4; the CPU presets 4 x 1), gradient checkpointing.
- `ours`: core.training.train_adapter, what the pipeline's train step runs, with the technique settings (packing,
  labels_only_logits, LoRA dropout, gradient checkpointing, liger, activation offloading) of the pipeline config
  (--config, default configs/default.yaml).
- `ours-no-<technique>`: ours with one technique switched off (for checkpointing-off: switched on again).
- `ref-fp32`, `ref-dequantized` (CPU presets): ours on the base unquantized in fp32, and on the 4-bit weights
  dequantized to fp32 (core/training/reference.py): the training ours must track (its loss after, to the digit).
Every row uses the preset's learning rate, schedule, LoRA r/alpha/targets, compute dtype (bf16 on CUDA, fp32 on CPU),
number of optimizer steps and training rows (one epoch of the same seeded rows), so a ratio measures technique, not
recipe. With packing a micro-batch is one packed sequence of a token budget: the smallest (from max(longest row,
tutorial rows per micro-batch x mean row length), in 1% steps) at which packing fits every row into the tutorial's
number of steps, so ours trains on exactly the tutorial's rows and about as many real tokens per step; each row's
`train_tokens` shows what it trained on.

Workloads: `chat` (lengths lognormal around the preset's median, clipped) and `long` (every row at the maximum
length). The text is templated sentences over small word lists (learnable: the loss falls), tokenized with SmolLM2's
tokenizer; the first 40-70% of each row is the prompt (label -100), the rest the response.

Per row: real (non-pad) tokens/s and seconds per optimizer step (steady state: from the end of step 1 to the end of
the last step), time from process start to the end of the first step, peak memory (CPU: peak RSS of the row's
process; CUDA: max allocated and reserved), the held-out loss before and after training (a fixed synthetic batch,
scored unpacked with the model's own loss for every row), and on CUDA the MFU: (4 N_linear + 6 N_lora + attention)
FLOPs per real token against the GPU's dense bf16 peak. Prints a table per workload with the ratios ours/tutorial;
--json writes every row.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import common

START = time.perf_counter()  # the row's clock starts with its process

IGNORE_INDEX = -100
TUTORIAL_DROPOUT = 0.05
TUTORIAL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEED = 1234
HELDOUT_SEED = 99


@dataclass(frozen=True)
class Workload:
    name: str
    median: int  # tokens; chat: lognormal median, long: every row
    lo: int  # clip range, tokens
    hi: int
    steps: int  # optimizer steps per row
    rows: tuple[str, ...] | None = None  # which rows run on this workload (None: all)
    sigma: float = 0.7  # lognormal shape of chat lengths
    on_request: bool = False  # runs only when named in --workloads


@dataclass(frozen=True)
class Preset:
    name: str
    model: str  # tiny | bundled | llama-1b | llama-8b
    cuda: bool
    micro: int  # tutorial rows per micro-batch
    accum: int  # tutorial gradient accumulation
    lr: float
    workloads: tuple[Workload, ...]
    r: int = 16
    alpha: int = 32
    heldout_rows: int = 8
    note: str = ""


PRESETS = {
    "smoke": Preset(
        "smoke",
        "tiny",
        cuda=False,
        micro=4,
        accum=1,
        lr=2e-4,
        workloads=(Workload("chat", 48, 16, 128, steps=4), Workload("long", 128, 128, 128, steps=2)),
        heldout_rows=4,
        note="tiny 2-layer Llama: checks that every row runs, its numbers mean nothing",
    ),
    "cpu": Preset(
        "cpu",
        "bundled",
        cuda=False,
        micro=4,
        accum=1,
        lr=2e-4,
        workloads=(
            Workload("chat", 128, 16, 512, steps=20),
            Workload("long", 512, 512, 512, steps=5, rows=("tutorial", "ours")),
            # the default run's rows (data/acme_support: ~46 tokens, at most ~130): fits its 192-token micro-batches
            # (--config-geometry); benchmarks/concurrent_runs.py trains on it
            Workload("support", 46, 24, 160, steps=30, rows=("ours",), on_request=True),
        ),
        note="SmolLM2-135M-Instruct (bundled), fp32 compute",
    ),
    "gpu-1b": Preset(
        "gpu-1b",
        "llama-1b",
        cuda=True,
        micro=4,
        accum=4,
        lr=2e-4,
        workloads=(Workload("chat", 256, 32, 2048, steps=20), Workload("long", 2048, 2048, 2048, steps=10)),
        note="Llama-3.2-1B shape, random weights, bf16 compute",
    ),
    "gpu-8b": Preset(
        "gpu-8b",
        "llama-8b",
        cuda=True,
        micro=4,
        accum=4,
        lr=2e-4,
        workloads=(Workload("chat", 256, 32, 2048, steps=20), Workload("long", 2048, 2048, 2048, steps=10)),
        note="Llama-3.1-8B shape, random weights, bf16 compute",
    ),
}

# Dense bf16 tensor-core peaks (TFLOP/s) from NVIDIA's data sheets, matched against torch.cuda.get_device_name().
GPU_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("A100", 312.0))
PACKAGES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate")  # versions reported


# --- synthetic data -------------------------------------------------------------------------------------------------

WORDS = {
    "item": ["tent", "sleeping bag", "rain jacket", "camp stove", "headlamp", "backpack", "water filter", "canoe"],
    "color": ["red", "green", "blue", "orange", "grey", "yellow"],
    "city": ["Denver", "Portland", "Boise", "Tucson", "Duluth", "Reno", "Bend", "Moab"],
    "verb": ["ships", "arrives", "is returned", "is repaired", "is restocked"],
    "cond": ["unopened", "damaged", "unused", "worn", "missing parts"],
    "action": ["refund", "replace", "repair", "inspect"],
}
TEMPLATES = [
    "The {color} {item} {verb} from {city} in {n} days.",
    "A {item} costs {price} dollars at the {city} store.",
    "If the {item} is {cond}, we {action} it within {n} days.",
    "Order {id} holds one {color} {item} and one {item2}.",
    "Customers in {city} often ask whether the {item} {verb} on time.",
    "Our {city} team will {action} any {cond} {item} for free.",
]


def _sentences(rng, n: int) -> list[str]:
    out = []
    for _ in range(n):
        template = TEMPLATES[rng.integers(len(TEMPLATES))]
        slots = {k: v[rng.integers(len(v))] for k, v in WORDS.items()}
        slots["item2"] = WORDS["item"][rng.integers(len(WORDS["item"]))]
        out.append(
            " "
            + template.format(
                n=int(rng.integers(2, 15)), price=int(rng.integers(10, 400)), id=int(rng.integers(1000, 9999)), **slots
            )
        )
    return out


def row_lengths(work: Workload, n: int, rng) -> list[int]:
    if work.lo == work.hi:
        return [work.hi] * n
    raw = work.median * rng.lognormal(0.0, work.sigma, size=n)
    return [int(x) for x in raw.clip(work.lo, work.hi).round()]


def synthetic_rows(tokenizer, work: Workload, n: int, seed: int) -> dict[str, list]:
    """n rows of input_ids/labels: templated sentences cut to lognormal lengths, the first 40-70% is the prompt."""
    import numpy as np

    rng = np.random.default_rng(seed)
    pool = [tokenizer(s, add_special_tokens=False)["input_ids"] for s in _sentences(rng, 2048)]
    rows = {"input_ids": [], "labels": []}
    for length in row_lengths(work, n, rng):
        ids: list[int] = []
        while len(ids) < length:
            ids.extend(pool[rng.integers(len(pool))])
        ids = ids[:length]
        prompt = min(max(1, int(length * rng.uniform(0.4, 0.7))), length - 1)
        rows["input_ids"].append(ids)
        rows["labels"].append([IGNORE_INDEX] * prompt + ids[prompt:])
    return rows


# --- models ---------------------------------------------------------------------------------------------------------


def prepare_model(preset: Preset, work_dir: Path) -> Path:
    """The model folder every row loads: the tiny test model, the bundled SmolLM2, or a random-weight Llama shape."""
    import torch

    from core.tiny import build_tiny_model

    if preset.model == "bundled":
        from core.models import bundled_model_dir

        return bundled_model_dir()
    if preset.model == "tiny":
        out, shape, dtype = work_dir / "tiny-llama", {}, torch.float32
    else:
        from core.models import cache_root

        out, shape, dtype = cache_root() / "bench" / preset.model, common.LLAMA_SHAPES[preset.model], torch.bfloat16
    if (out / "config.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=out.parent))
    # random init on the GPU when there is one: minutes faster at 8B
    device = "cuda" if torch.cuda.is_available() else "cpu"
    build_tiny_model(tmp, dtype=dtype, device=device, max_position_embeddings=8192, **shape)
    os.replace(tmp, out)  # atomic: an interrupted build is never taken for a finished one
    return out


# --- rows -----------------------------------------------------------------------------------------------------------


def pipeline_settings(config_path: Path):
    """(TrainConfig, LoraSettings) of a pipeline config: where ours takes its technique settings from."""
    from core.config import load_config

    cfg = load_config(config_path)
    return cfg.train, cfg.lora


def _liger_on(setting, cuda: bool) -> bool:
    """core.training's resolve_liger answer (never an error), without importing the training stack into the driver."""
    import importlib.util

    return cuda and (setting is True or (setting == "auto" and importlib.util.find_spec("liger_kernel") is not None))


def techniques(train, lora, cuda: bool) -> dict[str, dict]:
    """Each technique ours uses on this device -> the settings that switch it off."""
    found = {}
    if train.packing:
        found["packing"] = {"train": {"packing": False}}
    if train.labels_only_logits and not cuda:  # on CUDA trl's fused head already scores labelled positions only
        found["labels-only-logits"] = {"train": {"labels_only_logits": False}}
    if lora.dropout == 0:
        found["lora-dropout-0"] = {"lora": {"dropout": TUTORIAL_DROPOUT}}
    if not train.gradient_checkpointing:
        found["checkpointing-off"] = {"train": {"gradient_checkpointing": True}}
    if _liger_on(train.use_liger_kernel, cuda):
        found["liger"] = {"train": {"use_liger_kernel": False}}
    if cuda and train.activation_offloading:
        found["activation-offloading"] = {"train": {"activation_offloading": False}}
    return found


# Training references for ours (its settings and data; only the base's weights differ): the base unquantized in fp32
# (plain LoRA), and the 4-bit weights dequantized to fp32 (core/training/reference.py), which 4-bit training must
# track exactly. CPU presets only: fp32 copies of an 8B base do not fit where the GPU presets run.
REFERENCES = ("ref-fp32", "ref-dequantized")


def row_names(train, lora, cuda: bool) -> list[str]:
    refs = [] if cuda else list(REFERENCES)
    return ["tutorial", "ours"] + [f"ours-no-{t}" for t in techniques(train, lora, cuda)] + refs


@dataclass
class RowSpec:
    row: str
    preset: str
    workload: str
    steps: int
    model_dir: str
    config: str
    out: str
    work_dir: str
    heldout_rows: int = 8
    extra: dict = field(default_factory=dict)


def packed_count(lengths: list[int], budget: int) -> int:
    """How many packed sequences trl's best-fit-decreasing packing (the train step's) makes of these rows."""
    from datasets import Dataset
    from trl.data_utils import pack_dataset

    return len(pack_dataset(Dataset.from_dict({"input_ids": [[0] * n for n in lengths]}), budget, strategy="bfd"))


def batch_geometry(preset: Preset, lengths: list[int], steps: int) -> dict[str, int]:
    """Ours with packing: one packed sequence per micro-batch of `budget` tokens, `accum` of them per step.

    The tutorial trains on every row once (steps x its rows per step = the data). So that ours trains on the same
    rows in the same number of optimizer steps, the budget starts at max(longest row, the tutorial's mean tokens
    per micro-batch) and grows by 1% until packing makes at most steps x accum sequences: best-fit decreasing never
    fills every sequence, and at the starting budget a few rows would be left for steps that never run.
    """
    mean = sum(lengths) / len(lengths)
    budget = max(max(lengths), round(preset.micro * mean))
    accum = max(1, round(preset.micro * preset.accum * mean / budget))
    while packed_count(lengths, budget) > steps * accum:
        budget += max(1, budget // 100)
    return {"tokens_per_micro_batch": budget, "micro_batch_size": 1, "grad_accum": accum}


def meter_callback(heldout: list[dict]):
    """A TrainerCallback (transformers loads in the worker only): step end times and real tokens seen, and the
    held-out loss before the first step and after the last, its scoring time taken out of every timing."""
    from transformers import TrainerCallback

    from core.training.trainer import keep_4bit_differentiable

    class Meter(TrainerCallback):
        def __init__(self):
            self.excluded = 0.0  # seconds spent scoring the held-out rows
            self.train_begin = None
            self.steps: list[tuple[float, int]] = []
            self.first_loss = self.last_loss = None
            self.train_losses: list[float] = []

        def _score(self, model) -> float:
            t = time.perf_counter()
            loss = heldout_loss(model, heldout)
            self.excluded += time.perf_counter() - t
            return loss

        def on_train_begin(self, args, state, control, model=None, **kw):
            # Scoring runs in eval mode without gradients, which on AVX512-BF16 CPUs would switch bitsandbytes'
            # 4-bit layers to its inference kernel (no autograd) for the rest of training: keep every row on the
            # training path, so that measuring does not change what is measured (docs/performance.md).
            keep_4bit_differentiable(model)
            self.first_loss = self._score(model)
            self.train_begin = time.perf_counter() - self.excluded

        def on_step_end(self, args, state, control, **kw):
            self.steps.append((time.perf_counter() - self.excluded, int(state.num_input_tokens_seen)))

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.train_losses.append(float(logs["loss"]))

        def on_train_end(self, args, state, control, model=None, **kw):
            self.last_loss = self._score(model)

    return Meter()


def heldout_loss(model, batch: list[dict]) -> float:
    """Mean response-token loss of the held-out rows: unpadded, one row at a time, the model's own loss."""
    import torch

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(p for p in model.parameters()).device
    with torch.no_grad():
        for row in batch:
            ids = torch.tensor([row["input_ids"]], device=device)
            labels = torch.tensor([row["labels"]], device=device)
            n = int((labels[:, 1:] != IGNORE_INDEX).sum())
            out = model(input_ids=ids, labels=labels, use_cache=False)
            total += float(out.loss) * n
            count += n
    model.train(was_training)
    return total / max(count, 1)


def run_tutorial(spec: RowSpec, preset: Preset, train_ds, heldout, meter):
    """The seeds' recipe, written as the tutorials write it (no code from this project's train step)."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, set_seed
    from trl import SFTConfig, SFTTrainer

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(spec.model_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    bnb = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
    )
    kwargs = {"device_map": {"": 0}} if cuda else {}
    model = AutoModelForCausalLM.from_pretrained(spec.model_dir, quantization_config=bnb, dtype=dtype, **kwargs)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    set_seed(SEED)
    lora = LoraConfig(
        r=preset.r,
        lora_alpha=preset.alpha,
        lora_dropout=TUTORIAL_DROPOUT,
        target_modules=TUTORIAL_TARGETS,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    spec.extra.update(
        train={"packing": False, "gradient_checkpointing": True, "micro_batch_size": preset.micro}
        | {"grad_accum": preset.accum},
        lora_dropout=TUTORIAL_DROPOUT,
    )
    args = SFTConfig(
        output_dir=str(Path(spec.work_dir) / "tutorial"),
        max_steps=spec.steps,
        learning_rate=preset.lr,
        per_device_train_batch_size=preset.micro,
        gradient_accumulation_steps=preset.accum,
        gradient_checkpointing=True,
        optim="paged_adamw_8bit" if cuda else "adamw_torch",
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        bf16=cuda,
        use_cpu=not cuda,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        max_length=None,
        packing=False,
        include_num_input_tokens_seen="non_padding",
        seed=SEED,
        data_seed=SEED,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, processing_class=tokenizer, callbacks=[meter])
    if dtype != torch.bfloat16:  # same compute dtype on every row: undo trl's bf16 cast of the LoRA weights on CPU
        for p in trainer.model.parameters():
            if p.requires_grad:
                p.data = p.data.to(dtype)
    trainer.train()
    return model


def run_ours(spec: RowSpec, preset: Preset, train_ds, heldout_ds, meter, lengths: list[int]):
    """core.training.train_adapter with the pipeline config's technique settings and the preset's recipe."""
    from core.config import ModelSource, QuantConfig
    from core.logs import quiet_libraries
    from core.training import train_adapter

    train_cfg, lora_cfg = pipeline_settings(Path(spec.config))
    quant = QuantConfig(compute_dtype="auto")
    if spec.row == "ref-fp32":
        quant = QuantConfig(load_in_4bit=False, compute_dtype="float32")
    elif spec.row == "ref-dequantized":
        from core.training import trainer
        from core.training.reference import build_dequantized_model

        trainer.build_model = build_dequantized_model  # this row's process only
    elif spec.row != "ours":
        off = techniques(train_cfg, lora_cfg, preset.cuda)[spec.row.removeprefix("ours-no-")]
        train_cfg = train_cfg.model_copy(update=off.get("train", {}))
        lora_cfg = lora_cfg.model_copy(update=off.get("lora", {}))
    if spec.extra.get("config_geometry"):  # the config's own micro-batches (e.g. the default run's 192 tokens)
        geometry = {}
    elif train_cfg.packing:
        geometry = batch_geometry(preset, lengths, spec.steps)
    else:
        geometry = {"tokens_per_micro_batch": None, "micro_batch_size": preset.micro, "grad_accum": preset.accum}
    train_cfg = train_cfg.model_copy(
        update=dict(
            geometry,
            max_steps=spec.steps,
            learning_rate=preset.lr,
            warmup_ratio=0.05,
            lr_scheduler="cosine",
            weight_decay=0.0,
            optim="auto",
            eval_every=0,
            save_every=10**9,
            logging_steps=1,
            seed=SEED,
            checkpoint_dir=str(Path(spec.work_dir) / "ckpt"),
            num_processes=1,
        )
    )
    lora_cfg = lora_cfg.model_copy(update=dict(r=preset.r, alpha=preset.alpha, target_modules="all-linear"))
    spec.extra.update(
        train={k: getattr(train_cfg, k) for k in ("packing", "labels_only_logits", "gradient_checkpointing")}
        | geometry,
        lora_dropout=lora_cfg.dropout,
    )
    quiet_libraries()
    train_adapter(
        train_ds,
        heldout_ds,
        ModelSource(source="local", name=spec.model_dir),
        quant,
        lora_cfg,
        train_cfg,
        Path(spec.work_dir) / "adapter",
        callbacks=[meter],
    )


def flops_per_token(model_dir: str, r: int, lengths: list[int]) -> float:
    """Training FLOPs per real token: 4 N_linear (frozen: forward + input gradient) + 6 N_lora + causal attention."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir)
    h, inter, layers = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    head_dim = getattr(c, "head_dim", None) or h // c.num_attention_heads
    q, kv = c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim
    shapes = [(h, q), (h, kv), (h, kv), (q, h), (h, inter), (h, inter), (inter, h)]  # q k v o gate up down
    n_linear = layers * sum(i * o for i, o in shapes) + h * c.vocab_size  # + lm_head
    n_lora = layers * sum(r * (i + o) for i, o in shapes)
    mean_context = sum(s * (s + 1) / 2 for s in lengths) / sum(lengths)  # causal, within each row
    attention = 3 * 4 * layers * q * mean_context  # QK^T and AV, forward + backward
    return 4 * n_linear + 6 * n_lora + attention


def gpu_peak_tflops(name: str) -> float | None:
    return next((peak for key, peak in GPU_PEAK_TFLOPS if key in name), None)


def worker(spec_path: Path) -> None:
    """One row, in this process: build the data, train, measure, write the result JSON."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer

    from core.training.compute import compute_settings

    spec = RowSpec(**json.loads(spec_path.read_text()))
    preset = PRESETS[spec.preset]
    work = next(w for w in preset.workloads if w.name == spec.workload)
    tokenizer = AutoTokenizer.from_pretrained(spec.model_dir)
    rows = synthetic_rows(tokenizer, work, spec.steps * preset.micro * preset.accum, SEED)
    heldout = synthetic_rows(tokenizer, work, spec.heldout_rows, HELDOUT_SEED)
    heldout_list = [{"input_ids": i, "labels": lbl} for i, lbl in zip(heldout["input_ids"], heldout["labels"])]
    lengths = [len(x) for x in rows["input_ids"]]
    meter = meter_callback(heldout_list)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    if spec.row == "tutorial":
        run_tutorial(spec, preset, Dataset.from_dict(rows), heldout_list, meter)
    else:
        run_ours(spec, preset, Dataset.from_dict(rows), Dataset.from_dict(heldout), meter, lengths)

    ends = meter.steps
    if not ends:
        raise RuntimeError("no optimizer step finished")
    if len(ends) > 1:
        span = ends[-1][0] - ends[0][0]
        tokens = ends[-1][1] - ends[0][1]
        s_per_step = span / (len(ends) - 1)
    else:
        span, tokens = ends[0][0] - meter.train_begin, ends[0][1]
        s_per_step = span
    result = {
        "row": spec.row,
        "preset": spec.preset,
        "workload": spec.workload,
        "device": common.device_name(threads=True),
        "versions": common.versions(*PACKAGES),
        "compute_settings": compute_settings(),  # as this row's process ran: threads, matmul precision, kernels
        "steps": len(ends),
        "train_tokens": ends[-1][1],
        "real_tokens_per_s": tokens / span if span > 0 else None,
        "s_per_step": s_per_step,
        "time_to_first_step_s": ends[0][0] - START,
        "first_loss": meter.first_loss,
        "last_loss": meter.last_loss,
        "train_loss_first": meter.train_losses[0] if meter.train_losses else None,
        "train_loss_last": meter.train_losses[-1] if meter.train_losses else None,
        "peak_rss_bytes": common.peak_rss_bytes(),
        "settings": spec.extra,
    }
    result["peak_mem_bytes"] = result["peak_rss_bytes"]
    result["mfu"] = None
    if cuda:
        result["peak_mem_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
        result["peak_mem_reserved_bytes"] = int(torch.cuda.max_memory_reserved())
        result["peak_mem_bytes"] = result["peak_mem_reserved_bytes"]
        peak = spec.extra.get("peak_tflops") or gpu_peak_tflops(torch.cuda.get_device_name())
        if peak and result["real_tokens_per_s"]:
            flops = flops_per_token(spec.model_dir, preset.r, lengths)
            result["mfu"] = result["real_tokens_per_s"] * flops / (peak * 1e12)
    Path(spec.out).write_text(json.dumps(result, indent=1))


# --- driver ---------------------------------------------------------------------------------------------------------


def _fmt_bytes(n) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f} MiB"


TABLE = [  # (column, least width, alignment)
    ("row", 28, "<"),
    ("tokens/s", 10, ">"),
    ("x tut", 7, ">"),
    ("s/step", 9, ">"),
    ("peak mem", 12, ">"),
    ("x tut", 7, ">"),
    ("1st step s", 11, ">"),
    ("loss before", 12, ">"),
    ("loss after", 11, ">"),
    ("vs tut", 8, ">"),
    ("tokens", 9, ">"),
    ("MFU", 7, ">"),
]


def table(results: list[dict]) -> str:
    """One table per workload; ratios against that workload's tutorial row."""
    head, widths, align = map(list, zip(*TABLE))
    lines = []
    for work in dict.fromkeys(r["workload"] for r in results):
        rows = [r for r in results if r["workload"] == work]
        base = next((r for r in rows if r["row"] == "tutorial" and "error" not in r), None)
        cells = []
        for r in rows:
            if "error" in r:
                cells.append(f"{r['row']:<28}  failed: {r['error'][-200:]}")
                continue
            tps, mem = r["real_tokens_per_s"], r["peak_mem_bytes"]
            x_tps = tps / base["real_tokens_per_s"] if base and tps and base["real_tokens_per_s"] else None
            x_mem = mem / base["peak_mem_bytes"] if base else None
            dloss = (r["last_loss"] / base["last_loss"] - 1) * 100 if base and base["last_loss"] else None
            fmt = common.fmt
            cells.append(
                [r["row"], fmt(tps, ",.1f"), fmt(x_tps), fmt(r["s_per_step"]), _fmt_bytes(mem), fmt(x_mem)]
                + [fmt(r["time_to_first_step_s"], ".1f"), fmt(r["first_loss"], ".4f"), fmt(r["last_loss"], ".4f")]
                + [fmt(dloss, "+.2f") + "%" if dloss is not None else "-", r["train_tokens"]]
                + [fmt(r["mfu"] * 100 if r["mfu"] else None, ".1f")]
            )
        lines.append(f"\nworkload: {work}")
        lines += common.format_table(head, cells, widths=widths, align="".join(align), sep="")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = common.preset_parser(__doc__, PRESETS, "smoke", "write every row's measurements here (a JSON list)")
    parser.add_argument("--rows", help="comma-separated rows to run (default: all), e.g. tutorial,ours")
    parser.add_argument("--steps", type=int, help="optimizer steps per row, overriding the preset (quick checks)")
    parser.add_argument("--workloads", help="comma-separated workloads (default: the preset's), e.g. chat")
    parser.add_argument("--config", type=Path, default=common.REPO / "configs" / "default.yaml", help="ours' settings")
    parser.add_argument(
        "--config-geometry",
        action="store_true",
        help="ours keeps the config's micro-batch and accumulation (default: the preset's, to match the tutorial)",
    )
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, for MFU on unlisted GPUs")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0

    import torch

    preset = PRESETS[args.preset]
    if preset.cuda and not torch.cuda.is_available():
        return common.needs_cuda(f"preset {preset.name}")
    if not preset.cuda and torch.cuda.is_available():
        print(f"note: preset {preset.name} is a CPU preset; CUDA is visible, so rows will run on the GPU")
    train_cfg, lora_cfg = pipeline_settings(args.config)
    all_rows = row_names(train_cfg, lora_cfg, torch.cuda.is_available())
    wanted = common.pick(parser, "--rows", args.rows, all_rows)  # the rows this device and config have
    on_request = [w.name for w in preset.workloads if w.on_request]
    names = common.pick(parser, "--workloads", args.workloads, [w.name for w in preset.workloads])
    if not args.workloads:
        names = [n for n in names if n not in on_request]
    workloads = [w for w in preset.workloads if w.name in names]

    work_dir = Path(tempfile.mkdtemp(prefix="bench-train-"))
    # rows import ZenML: a throwaway store, not the user's
    env = common.bench_env(work_dir / "zenml", HF_HUB_OFFLINE="1")
    model_dir = prepare_model(preset, work_dir)
    print(f"preset {preset.name}: {preset.note}")
    print(f"device: {common.device_name(threads=True)}")
    print("versions: " + common.describe(common.versions(*PACKAGES)))
    # what decides the numbers on this machine (core.training.compute.compute_settings; each row pins the same)
    from core.training.compute import compute_settings

    print("settings: " + common.describe(compute_settings()))
    print(f"ours: technique settings from {args.config}; rows: {', '.join(wanted)}")

    results = []
    for work in workloads:
        steps = args.steps or work.steps
        for row in wanted:
            if work.rows is not None and row not in work.rows and not args.rows:
                continue
            row_dir = work_dir / f"{work.name}-{row}"
            row_dir.mkdir()
            spec = RowSpec(
                row=row,
                preset=preset.name,
                workload=work.name,
                steps=steps,
                model_dir=str(model_dir),
                config=str(args.config.resolve()),
                out=str(row_dir / "result.json"),
                work_dir=str(row_dir),
                heldout_rows=preset.heldout_rows,
                extra={"peak_tflops": args.peak_tflops, "config_geometry": args.config_geometry},
            )
            (row_dir / "spec.json").write_text(json.dumps(asdict(spec)))
            started = time.perf_counter()
            # cwd: the row's own folder, so ZenML (imported by the train step) never touches a checkout's .zen/
            proc = common.run_fresh(__file__, ["--worker", str(row_dir / "spec.json")], env, cwd=row_dir)
            if proc.returncode == 0:
                result = json.loads((row_dir / "result.json").read_text())
                result["wall_s"] = time.perf_counter() - started
                print(
                    f"  {work.name:<6}{row:<28}{common.fmt(result['real_tokens_per_s'], ',.1f'):>10} tokens/s  "
                    f"loss {common.fmt(result['first_loss'], '.3f')} -> {common.fmt(result['last_loss'], '.3f')}  "
                    f"({result['wall_s']:.0f} s)",
                    flush=True,
                )
            else:
                result = {"row": row, "workload": work.name, "preset": preset.name, "error": proc.stderr[-3000:]}
                print(f"  {work.name:<6}{row:<28}failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", flush=True)
            results.append(result)
    print(table(results))
    if args.json:
        common.write_json(args.json, results)
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
