"""Streamed LoRA merge: base safetensors + adapter -> fp16/bf16 safetensors, one tensor chunk at a time.

    python benchmarks/merge.py --preset cpu     # this merge next to peft's merge_and_unload

peft's `merge_and_unload` needs the whole base model in memory (and then a
second copy while `save_pretrained` serialises it). Here nothing but a chunk
of one tensor is ever in memory: the base's shards are read with
`safetensors.safe_open`, a few rows of a weight at a time; where the adapter
targets that weight, `scale * (B @ A)` for those rows is added in fp32 (on the
GPU when there is one); the result is cast to the merge dtype and written
straight into an output shard whose safetensors header was laid out in
advance from the input headers. Peak host memory is the interpreter plus a
few chunks (`chunk_bytes`), whatever the model or shard size.

Not mmap-ed for long: a `safe_open` handle is reopened for every chunk, because
the pages of a handle's memory map stay in this process's resident set until
the handle closes (a whole 5 GB shard by the end of it otherwise).

What is streamed: plain LoRA on Linear, Conv1D and Embedding weights that
are not tied to another weight; scale = lora_alpha / r, or lora_alpha /
sqrt(r) with rslora, with `rank_pattern` / `alpha_pattern` as peft matches
them. Anything whose merge peft computes differently (DoRA, modules_to_save,
trainable tokens, lora_bias, PiSSA/OLoRA-style inits that rewrite the base,
quantized base checkpoints, ...) raises `NotStreamable` with the reasons, and
the caller falls back to peft (see core/merge/adapter.py).

Output: `model.safetensors`, or `model-0000i-of-0000n.safetensors` shards of
at most `max_shard_size` plus `model.safetensors.index.json`, the same names
and index transformers' `save_pretrained` writes; config.json with the merge
dtype and no quantization_config; generation config and tokenizer files. It is
written to a temporary sibling folder and renamed into place only when
complete, so a failure leaves nothing behind.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

PEFT_PREFIX = "base_model.model."
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
# adapter tensor suffix -> (layer kind, which factor)
LORA_SUFFIXES = {
    ".lora_A.weight": ("linear", "A"),
    ".lora_B.weight": ("linear", "B"),
    ".lora_embedding_A": ("embedding", "A"),
    ".lora_embedding_B": ("embedding", "B"),
}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
)
ST_ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}  # fmt: skip
# safetensors dtypes that are cast to the merge dtype (what from_pretrained(dtype=...) does to float weights)
CASTABLE = {"F64", "F32", "F16", "BF16"}
ST_NAME = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}
# init_lora_weights values whose merge is plain B @ A on the unchanged base weight
PLAIN_INITS = (True, False, "gaussian", "eva")
DEFAULT_CHUNK_BYTES = 32 << 20  # fp32 working set per chunk: larger = fewer reads, more memory


class NotStreamable(ValueError):
    """The adapter (or base checkpoint) needs peft's own merge; `reasons` says why."""

    def __init__(self, reasons: list[str]):
        self.reasons = reasons
        super().__init__("; ".join(reasons))


@dataclass
class Target:
    """One base weight the adapter changes: W += scale * left @ right (row-chunked)."""

    module: str
    a_key: str
    b_key: str
    scale: float
    transpose: bool  # delta = (B @ A).T: Conv1D (fan_in_fan_out) and Embedding weights


@dataclass
class TensorPlan:
    shard: str  # input shard file name
    key: str
    shape: tuple[int, ...]
    in_dtype: str  # safetensors dtype string
    out_dtype: str
    target: Target | None = None

    @property
    def out_bytes(self) -> int:
        return math.prod(self.shape) * ST_ITEMSIZE[self.out_dtype]


@dataclass
class MergePlan:
    base_dir: Path
    adapter_dir: Path
    dtype: torch.dtype
    tensors: list[TensorPlan]
    config: object  # transformers PretrainedConfig, already set to the merge dtype
    input_shards: list[Path] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # tied copies; save_pretrained drops them too


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """The merge dtype as a torch dtype: float16, bfloat16 or float32, else ValueError."""
    if isinstance(dtype, torch.dtype):
        out = dtype
    else:
        out = getattr(torch, str(dtype), None)
    if out not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"merge dtype must be float16, bfloat16 or float32, not {dtype!r}")
    return out


def parse_size(size: int | str) -> int:
    """'2GB' / '500MB' / '64KiB' / 1000 -> bytes (transformers' convention: GB = 10**9)."""
    from transformers.utils.hub import convert_file_size_to_int

    try:
        value = convert_file_size_to_int(size)
    except ValueError:
        raise ValueError(f"merge.max_shard_size: {size!r} is not a size such as '2GB' or '500MB'") from None
    if value <= 0:
        raise ValueError(f"merge.max_shard_size: {size!r} must be positive")
    return value


def read_adapter_config(adapter_dir: Path) -> dict:
    """adapter_config.json as a dict; FileNotFoundError naming the folder when it is not a peft adapter."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no adapter config; is {adapter_dir} a peft adapter folder?") from None


def config_blockers(cfg: dict) -> list[str]:
    """Reasons, from adapter_config.json alone, why peft's merge is not plain W + scale * B @ A."""
    reasons = []
    if cfg.get("peft_type", "LORA") != "LORA":
        reasons.append(f"peft_type {cfg.get('peft_type')} is not LORA")
    flags = {
        "use_dora": "DoRA (magnitude vector rescales each merged column)",
        "lora_bias": "lora_bias (B has a bias term)",
        "use_qalora": "QALoRA",
        "modules_to_save": "modules_to_save (whole modules replaced by trained copies)",
        "trainable_token_indices": "trainable_token_indices (trained embedding rows)",
        "target_parameters": "target_parameters (LoRA on raw parameters)",
        "layer_replication": "layer_replication (changes the layer stack)",
        "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
        "megatron_config": "megatron_config",
        "velora_config": "VeLoRA",
        "monteclora_config": "MonteCLoRA",
        "use_bdlora": "BD-LoRA",
        "arrow_config": "Arrow routing",
        "kasa_config": "KaSA",
    }
    for key, what in flags.items():
        if cfg.get(key):
            reasons.append(f"{what} is set")
    if cfg.get("bias", "none") != "none":
        reasons.append(f"bias={cfg['bias']!r} (trained base biases live in the adapter)")
    init = cfg.get("init_lora_weights", True)
    if init not in PLAIN_INITS:
        reasons.append(f"init_lora_weights={init!r} (may rewrite the base weights or select a LoRA variant)")
    return reasons


def _pattern_value(patterns: dict | None, module: str, default):
    """A per-module rank or alpha from rank_pattern / alpha_pattern, matched as peft matches them."""
    if not patterns:
        return default
    from peft.utils.other import get_pattern_key

    return patterns.get(get_pattern_key(list(patterns), module), default)


def _base_shards(base_dir: Path) -> dict[str, str]:
    """tensor name -> shard file name, from the index or the single model.safetensors."""
    index = base_dir / SAFE_INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as err:
            raise ValueError(f"{index}: not a safetensors index ({err})") from None
        missing = sorted({f for f in weight_map.values() if not (base_dir / f).exists()})
        if missing:
            raise FileNotFoundError(f"{index} names shards that are not in {base_dir}: {missing}")
        return dict(weight_map)
    single = base_dir / SAFE_WEIGHTS
    if single.exists():
        with safe_open(single, "pt") as f:
            return dict.fromkeys(f.keys(), SAFE_WEIGHTS)
    raise NotStreamable([f"the base checkpoint in {base_dir} has no {SAFE_WEIGHTS} or {SAFE_INDEX}"])


def _fp32_patterns(meta_model, dtype: torch.dtype):
    """transformers' _keep_in_fp32_modules rules, matched the way its loader matches them."""
    patterns = []
    if dtype == torch.float16:
        patterns += list(getattr(meta_model, "_keep_in_fp32_modules", None) or [])
    if dtype in (torch.float16, torch.bfloat16):
        patterns += list(getattr(meta_model, "_keep_in_fp32_modules_strict", None) or [])
    if not patterns:
        return None
    from transformers.core_model_loading import build_glob_alternation

    return build_glob_alternation(sorted(set(patterns)))[0]


def plan_merge(base_dir: str | Path, adapter_dir: str | Path, dtype: str | torch.dtype = "float16") -> MergePlan:
    """Check that the merge can be streamed and lay out every output tensor. Raises NotStreamable."""
    base_dir, adapter_dir = Path(base_dir), Path(adapter_dir)
    dtype = resolve_dtype(dtype)
    acfg = _plain_lora_config(adapter_dir)
    config = _float_base_config(base_dir)
    meta = _meta_model(config)
    tied = getattr(meta, "all_tied_weights_keys", None) or {}
    fp32_re = _fp32_patterns(meta, dtype)
    adapter_shapes = _adapter_shapes(adapter_dir / ADAPTER_WEIGHTS)
    pairs, reasons = _pair_factors(adapter_shapes)
    weight_map = _base_shards(base_dir)
    targets, unfit = _targets(pairs, acfg, adapter_shapes, weight_map, meta, set(tied) | set(tied.values()))
    if reasons + unfit:
        raise NotStreamable(reasons + unfit)
    tensors, dropped, shards = _lay_out(base_dir, weight_map, targets, adapter_shapes, tied, fp32_re, dtype)
    config.dtype = dtype
    return MergePlan(base_dir, adapter_dir, dtype, tensors, config, [base_dir / s for s in shards], dropped)


def _plain_lora_config(adapter_dir: Path) -> dict:
    """The adapter's config, checked first: NotStreamable unless its merge is plain LoRA from safetensors."""
    acfg = read_adapter_config(adapter_dir)
    reasons = config_blockers(acfg)
    if not (adapter_dir / ADAPTER_WEIGHTS).exists():
        reasons.append(f"no {ADAPTER_WEIGHTS} in {adapter_dir} (a .bin adapter?)")
    if reasons:
        raise NotStreamable(reasons)
    return acfg


def _float_base_config(base_dir: Path):
    """The base's transformers config, with plain float weights: NotStreamable for a quantized checkpoint."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base_dir)
    quant = getattr(config, "quantization_config", None)
    if quant is not None:
        method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
        if str(method) != "gguf":  # a GGUF conversion's weights are plain floats already
            raise NotStreamable([f"the base checkpoint is quantized (quant_method={method})"])
        del config.quantization_config
    return config


def _meta_model(config):
    """The base architecture without weights (meta device): which module is which layer, which weights are tied."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except Exception as err:  # unknown or remote-code architectures: let peft/transformers deal with them
        raise NotStreamable([f"cannot build the base architecture on the meta device: {err}"]) from None


def _adapter_shapes(adapter_file: Path) -> dict[str, tuple[int, ...]]:
    """Every adapter tensor's shape, read from the safetensors header alone."""
    with safe_open(adapter_file, "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _pair_factors(adapter_shapes: dict[str, tuple[int, ...]]) -> tuple[dict[str, dict], list[str]]:
    """The adapter's A/B tensors paired per module ({"kind", "A", "B"}), and why any tensor is not a LoRA factor."""
    pairs: dict[str, dict] = {}
    reasons = []
    for key in adapter_shapes:
        for suffix, (kind, which) in LORA_SUFFIXES.items():
            if key.endswith(suffix) and key.startswith(PEFT_PREFIX):
                module = key[len(PEFT_PREFIX) : -len(suffix)]
                entry = pairs.setdefault(module, {"kind": kind})
                if entry["kind"] != kind:
                    reasons.append(f"{module}: both linear and embedding LoRA tensors")
                entry[which] = key
                break
        else:
            reasons.append(f"adapter tensor {key!r} is not a plain LoRA factor")
    return pairs, reasons


def _targets(
    pairs: dict[str, dict], acfg: dict, adapter_shapes: dict, weight_map: dict[str, str], meta, tied_weights: set[str]
) -> tuple[dict[str, Target], list[str]]:
    """The base weight each module's LoRA changes (by weight name), and why any module cannot be streamed."""
    targets: dict[str, Target] = {}
    reasons = []
    for module, entry in sorted(pairs.items()):
        target = _target(module, entry, acfg, adapter_shapes, weight_map, meta, tied_weights)
        if isinstance(target, str):
            reasons.append(target)
        else:
            targets[f"{module}.weight"] = target
    return targets, reasons


def _target(
    module: str, entry: dict, acfg: dict, adapter_shapes: dict, weight_map: dict[str, str], meta, tied_weights: set[str]
) -> Target | str:
    """One module's Target (factors, scale, orientation), or the reason its merge cannot be streamed."""
    if "A" not in entry or "B" not in entry:
        return f"{module}: lora_A or lora_B missing from the adapter"
    weight_key = f"{module}.weight"
    if weight_key not in weight_map:
        return f"{module}: the base checkpoint has no tensor {weight_key!r} (renamed or fused weights?)"
    if weight_key in tied_weights:
        return f"{module}: {weight_key} is tied to another weight"
    try:
        layer = meta.get_submodule(module)
    except AttributeError:
        return f"{module}: no such module in {type(meta).__name__}"
    transpose = _transposed(entry["kind"], layer)
    if transpose is None:
        return f"{module}: LoRA on {type(layer).__name__} is not streamed"
    a_shape, b_shape = adapter_shapes[entry["A"]], adapter_shapes[entry["B"]]
    r = _pattern_value(acfg.get("rank_pattern"), module, acfg.get("r", 8))
    alpha = _pattern_value(acfg.get("alpha_pattern"), module, acfg.get("lora_alpha", 8))
    if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != r or b_shape[1] != r:
        return f"{module}: LoRA shapes A{list(a_shape)} B{list(b_shape)} do not fit r={r}"
    scale = alpha / math.sqrt(r) if acfg.get("use_rslora") else alpha / r
    return Target(module, entry["A"], entry["B"], scale, transpose)


def _transposed(kind: str, layer) -> bool | None:
    """Whether the update is (B @ A).T for this layer (as peft merges it); None for a layer not streamed."""
    from transformers.pytorch_utils import Conv1D

    if kind == "linear" and isinstance(layer, torch.nn.Linear):
        return False
    if kind == "linear" and isinstance(layer, Conv1D):
        return True  # peft forces fan_in_fan_out=True for Conv1D, False for Linear
    if kind == "embedding" and isinstance(layer, torch.nn.Embedding):
        return True
    return None


def _lay_out(
    base_dir: Path,
    weight_map: dict[str, str],
    targets: dict[str, Target],
    adapter_shapes: dict,
    tied: dict,
    fp32_re,
    dtype: torch.dtype,
) -> tuple[list[TensorPlan], list[str], list[str]]:
    """Every output tensor in shard and name order, the tied copies dropped, and the input shard names."""
    tensors, dropped = [], []
    by_shard: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(key)
    for shard in sorted(by_shard):
        with safe_open(base_dir / shard, "pt") as f:
            present = set(f.keys())
            for key in sorted(by_shard[shard]):
                if key not in present:
                    raise ValueError(f"{base_dir / SAFE_INDEX} maps {key!r} to {shard}, which does not hold it")
                if key in tied:  # save_pretrained drops tied copies too; the config still ties them
                    dropped.append(key)
                    continue
                tensors.append(_tensor_plan(f, shard, key, targets.get(key), adapter_shapes, fp32_re, dtype))
    return tensors, dropped, sorted(by_shard)


def _tensor_plan(f, shard: str, key: str, target: Target | None, adapter_shapes: dict, fp32_re, dtype) -> TensorPlan:
    """One output tensor: its shape, its dtype after the cast, and its LoRA update checked against its shape."""
    sl = f.get_slice(key)
    shape, in_dtype = tuple(sl.get_shape()), sl.get_dtype()
    if in_dtype not in ST_ITEMSIZE:
        raise NotStreamable([f"{key}: dtype {in_dtype} is not supported here"])
    out_dtype = in_dtype
    if in_dtype in CASTABLE:
        out_dtype = "F32" if fp32_re is not None and fp32_re.search(key) else ST_NAME[dtype]
    if target is not None:
        if in_dtype not in CASTABLE or len(shape) != 2:
            raise NotStreamable([f"{key}: a {in_dtype} tensor of shape {list(shape)} cannot take a LoRA"])
        a_shape, b_shape = adapter_shapes[target.a_key], adapter_shapes[target.b_key]
        want = (b_shape[0], a_shape[1]) if not target.transpose else (a_shape[1], b_shape[0])
        if shape != want:
            raise ValueError(
                f"adapter does not fit the base: {key} is {list(shape)} but the LoRA update "
                f"for {target.module} is {list(want)}"
            )
    return TensorPlan(shard, key, shape, in_dtype, out_dtype, target)


def _assign_shards(tensors: list[TensorPlan], max_bytes: int) -> list[list[TensorPlan]]:
    """Greedy, in order, like huggingface_hub's splitter: a tensor larger than the limit gets its own shard."""
    shards: list[list[TensorPlan]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.out_bytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.out_bytes
    return shards if shards[0] else []


def _header(tensors: list[TensorPlan]) -> bytes:
    """A safetensors header (length prefix included) for `tensors`, laid out before any data is written."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.key] = {"dtype": t.out_dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.out_bytes]}
        offset += t.out_bytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return len(raw).to_bytes(8, "little") + raw


def _write(fh, tensor: torch.Tensor) -> int:
    """A tensor's raw bytes appended to `fh`; the number written."""
    flat = tensor.contiguous().reshape(-1)
    if flat.numel() == 0:
        return 0
    return fh.write(flat.view(torch.uint8).numpy().data)


def _load_factors(adapter_file: Path, target: Target, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(left, right) in fp32 on `device` with delta = scale * left @ right, rows aligned with the base weight."""
    with safe_open(adapter_file, "pt") as f:
        a = f.get_tensor(target.a_key).to(device=device, dtype=torch.float32)
        b = f.get_tensor(target.b_key).to(device=device, dtype=torch.float32)
    return (a.T.contiguous(), b.T.contiguous()) if target.transpose else (b, a)


def _stream_tensor(fh, plan: TensorPlan, base_dir: Path, adapter_file: Path, device, chunk_bytes: int) -> int:
    """One output tensor written chunk by chunk of rows, with its LoRA update added in fp32; bytes written."""
    out_dtype = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}.get(plan.out_dtype)
    path = base_dir / plan.shard
    if len(plan.shape) == 0:
        with safe_open(path, "pt") as f:
            t = f.get_tensor(plan.key)
        return _write(fh, t.to(out_dtype) if plan.in_dtype in CASTABLE else t)
    rows = plan.shape[0]
    row_numel = math.prod(plan.shape[1:]) or 1
    step = max(1, chunk_bytes // (row_numel * 4))
    factors = _load_factors(adapter_file, plan.target, device) if plan.target is not None else None
    written = 0
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        # A fresh handle per chunk: a handle's memory-mapped pages stay resident until it closes.
        with safe_open(path, "pt") as f:
            chunk = f.get_slice(plan.key)[start:stop]
        if factors is not None:
            left, right = factors
            work = chunk.to(device=device, dtype=torch.float32)
            work.addmm_(left[start:stop], right, alpha=plan.target.scale)
            chunk = work.to(out_dtype).cpu()
            del work
        elif plan.in_dtype in CASTABLE:
            chunk = chunk.to(out_dtype)
        written += _write(fh, chunk)
        del chunk
    return written


def _copy_side_files(base_dir: Path, out: Path, config, tokenizer) -> None:
    """config.json, the generation config and the tokenizer files next to the merged weights."""
    config.save_pretrained(out)
    gen = base_dir / "generation_config.json"
    if gen.exists():
        shutil.copy2(gen, out / gen.name)
    else:  # what save_pretrained writes for a generative model without one
        from transformers import GenerationConfig

        try:
            GenerationConfig.from_model_config(config).save_pretrained(out)
        except Exception:  # noqa: BLE001 - a model without generation settings ships none
            pass
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
        return
    for name in TOKENIZER_FILES:
        if (base_dir / name).exists():
            shutil.copy2(base_dir / name, out / name)
    for extra in base_dir.glob("*.tiktoken"):
        shutil.copy2(extra, out / extra.name)


def pick_device(device: str = "auto") -> torch.device:
    """The device the LoRA updates are computed on: CUDA when there is one (auto), else what merge.device says."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("merge.device is 'cuda' but no CUDA device is available (use 'auto' or 'cpu')")
    return torch.device(device)


def _claim_out_dir(out_dir: Path) -> None:
    """Refuse an output folder that already holds something; remove an empty placeholder so it can be replaced."""
    if out_dir.exists():
        if out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()  # an empty placeholder: replace it atomically below
        else:
            raise FileExistsError(f"merge output folder {out_dir} already exists and is not empty")


def stream_merge(
    base_dir: str | Path,
    adapter_dir: str | Path,
    out_dir: str | Path,
    dtype: str | torch.dtype = "float16",
    max_shard_size: int | str = "2GB",
    device: str = "auto",
    tokenizer=None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    plan: MergePlan | None = None,
) -> dict:
    """Merge `adapter_dir` into the safetensors base in `base_dir`, writing `out_dir`. Returns stats.

    Raises NotStreamable (before writing anything) when peft's merge is needed instead.
    `tokenizer`: saved with save_pretrained when given, else the base's tokenizer files are copied.
    """
    start = time.perf_counter()
    base_dir, adapter_dir, out_dir = Path(base_dir), Path(adapter_dir), Path(out_dir)
    plan = plan or plan_merge(base_dir, adapter_dir, dtype)
    max_bytes = parse_size(max_shard_size)
    dev = pick_device(device)
    shards = _assign_shards(plan.tensors, max_bytes)
    if not shards:
        raise ValueError(f"{base_dir}: the base checkpoint holds no tensors")
    names = _shard_names(len(shards))
    adapter_file = adapter_dir / ADAPTER_WEIGHTS
    _claim_out_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        for name, tensors in zip(names, shards):
            _write_shard(tmp / name, tensors, base_dir, adapter_file, dev, chunk_bytes)
        if len(shards) > 1:
            _write_index(tmp / SAFE_INDEX, plan.tensors, names, shards)
        _copy_side_files(base_dir, tmp, plan.config, tokenizer)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {
        "method": "streamed",
        "device": str(dev),
        "seconds": time.perf_counter() - start,
        "tensors": len(plan.tensors),
        "merged_tensors": sum(t.target is not None for t in plan.tensors),
        "shards": len(shards),
        "bytes": sum(t.out_bytes for t in plan.tensors),
        "largest_input_shard_bytes": max(p.stat().st_size for p in plan.input_shards),
    }


def _shard_names(count: int) -> list[str]:
    """The output shard file names transformers' save_pretrained uses: one model.safetensors, or numbered shards."""
    if count == 1:
        return [SAFE_WEIGHTS]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def _write_shard(path: Path, tensors: list[TensorPlan], base_dir: Path, adapter_file: Path, dev, chunk_bytes: int):
    """One output shard: the header laid out in advance, then each tensor streamed, every byte count checked."""
    header = _header(tensors)
    with open(path, "wb") as fh:
        fh.write(header)
        for t in tensors:
            n = _stream_tensor(fh, t, base_dir, adapter_file, dev, chunk_bytes)
            if n != t.out_bytes:
                raise RuntimeError(f"{t.key}: wrote {n} bytes, expected {t.out_bytes}")
        expected = len(header) + sum(t.out_bytes for t in tensors)
        if fh.tell() != expected:
            raise RuntimeError(f"{path.name}: {fh.tell()} bytes written, expected {expected}")


def _write_index(path: Path, tensors: list[TensorPlan], names: list[str], shards: list[list[TensorPlan]]) -> None:
    """model.safetensors.index.json for a sharded output: totals and which shard holds each tensor."""
    index = {
        "metadata": {
            "total_parameters": sum(math.prod(t.shape) for t in tensors),
            "total_size": sum(t.out_bytes for t in tensors),
        },
        "weight_map": {t.key: name for name, ts in zip(names, shards) for t in ts},
    }
    path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
