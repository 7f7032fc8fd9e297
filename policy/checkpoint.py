"""Checkpoints in the DeepSeek-V3.2 Hugging Face layout: config.json + safetensors.

What we write, vLLM and HF tools read: HF tensor names (routed experts split per expert,
`model.layers.{i}.mlp.experts.{e}.gate_proj.weight`), shards of at most `max_shard_size` with a
`model.safetensors.index.json` when there is more than one. What we read includes the released
checkpoint itself: FP8 e4m3 weights with per-block `weight_scale_inv` are dequantised, and the
multi-token-prediction block stored after the trunk is skipped, saying so. Every tensor is
checked: a missing, unexpected or wrongly shaped one is an error that names it.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .args import ModelArgs
from .model import Transformer

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_EXPERT_PARAM = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$")
_EXPERT_HF = re.compile(
    r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$"
)
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like '5GB' / '512MiB'."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([\d.]+)\s*([A-Za-z]*)\s*", size)
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"cannot parse size {size!r}; use e.g. 5GB or 512MiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def hf_tensors(model: Transformer) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) for every persistent tensor of the model, experts split per expert."""
    for name, t in model.state_dict().items():
        m = _EXPERT_PARAM.match(name)
        if m:
            for e in range(t.shape[0]):
                yield f"{m.group(1)}.{e}.{m.group(2)}.weight", t[e]
        else:
            yield name, t


def keeps_float32(name: str, tensor: torch.Tensor) -> bool:
    """Whether a tensor keeps its own dtype whatever the checkpoint's: the MoE selection bias
    (`*.e_score_correction_bias`, float32 in the released checkpoint: in bf16 it would round
    away the small differences that pick the experts) and non-float tensors."""
    return name.endswith("correction_bias") or not tensor.is_floating_point()


def serving_tensors(
    tensors: Iterator[tuple[str, torch.Tensor]] | list[tuple[str, torch.Tensor]],
    dtype: torch.dtype | None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor cast to `dtype` (None: as is) unless keeps_float32, on the CPU)."""
    for name, t in tensors:
        if dtype is not None and not keeps_float32(name, t):
            t = t.to(dtype)
        yield name, t.detach().to("cpu")


def dense_equivalent_config(config: dict[str, Any]) -> dict[str, Any]:
    """config.json of the dense DeepSeek-V3 model a DSA checkpoint equals while every sequence
    fits index_topk (the indexer then selects every key). Engines pick sparse attention by the
    presence of `index_*` keys, so they go."""
    out = {k: v for k, v in config.items() if not k.startswith("index")}
    out.update(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3")
    return out


def weight_files(directory: str | Path) -> dict[str, list[str]]:
    """The checkpoint's safetensors files -> the tensor names each holds (from the index when
    there is one). FileNotFoundError when the directory has neither layout."""
    directory = Path(directory)
    index = directory / INDEX_FILE
    if index.exists():
        files: dict[str, list[str]] = {}
        for name, fname in json.loads(index.read_text())["weight_map"].items():
            files.setdefault(fname, []).append(name)
        return files
    single = directory / SINGLE_FILE
    if not single.exists():
        raise FileNotFoundError(f"{directory}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
    with _damage_named(single), safe_open(single, framework="pt") as f:
        return {SINGLE_FILE: list(f.keys())}


def checkpoint_files(directory: str | Path) -> list[str]:
    """Every file a checkpoint's weights are made of: the safetensors files and the index."""
    names = sorted(weight_files(directory))
    return names + [INDEX_FILE] if (Path(directory) / INDEX_FILE).exists() else names


def tensor_names(directory: str | Path) -> set[str]:
    """The HF names of every tensor in a checkpoint directory."""
    return {name for names in weight_files(directory).values() for name in names}


def checkpoint_tensors(directory: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) of every tensor of a checkpoint directory, file by file."""
    directory = Path(directory)
    for fname in weight_files(directory):
        with (
            _damage_named(directory / fname),
            safe_open(directory / fname, framework="pt", device="cpu") as f,
        ):
            for name in f.keys():
                yield name, f.get_tensor(name)


def save_pretrained(
    model: Transformer,
    directory: str | Path,
    *,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Write config.json and safetensors weights (cast to `dtype` if given, but see
    keeps_float32) to `directory`. Returns the directory."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    limit = parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in serving_tensors(hf_tensors(model), dtype):
        t = t.contiguous().clone()  # safetensors refuses shared storage
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    cfg = model.args.to_dict()
    cfg["torch_dtype"] = str(dtype or model.lm_head.weight.dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for stale in list(out.glob("model*.safetensors")) + [out / INDEX_FILE]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        save_file(shards[0], out / SINGLE_FILE, metadata={"format": "pt"})
        return out
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / fname, metadata={"format": "pt"})
        for name, t in shard.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return out


@contextmanager
def _damage_named(path: Path) -> Iterator[None]:
    """A damaged weight file (a garbled or truncated header, bytes cut off) as one
    ValueError naming the file, instead of safetensors' own error."""
    try:
        yield
    except SafetensorError as e:
        raise ValueError(f"{path}: damaged safetensors file: {str(e).splitlines()[0]}") from None


def _dequantize_fp8(w: torch.Tensor, scale_inv: torch.Tensor, block: list[int]) -> torch.Tensor:
    """FP8 weight [O, I] times its per-block scale [ceil(O/bo), ceil(I/bi)] -> float32."""
    bo, bi = block
    s = scale_inv.float().repeat_interleave(bo, 0).repeat_interleave(bi, 1)
    return w.float() * s[: w.shape[0], : w.shape[1]]


def load_pretrained(
    directory: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    strict_config: bool = True,
) -> Transformer:
    """Build a Transformer from a checkpoint directory written by save_pretrained or released
    in the DeepSeek-V3.2 HF layout. Parameters are materialised directly on `device`."""
    directory = Path(directory)
    args = ModelArgs.from_json(directory / "config.json", strict=strict_config)
    if args.ignored_keys:
        log.info("config keys ignored (not architectural): %s", ", ".join(args.ignored_keys))
    qcfg = json.loads((directory / "config.json").read_text()).get("quantization_config") or {}
    block = list(qcfg.get("weight_block_size", [128, 128]))
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to(dtype).to_empty(device=device)
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    filled: set[tuple[str, int | None]] = set()
    skipped_mtp = 0
    for fname, names in weight_files(directory).items():
        with (
            _damage_named(directory / fname),
            safe_open(directory / fname, framework="pt", device="cpu") as f,
        ):
            available = set(f.keys())
            for name in names:
                if name.endswith("_scale_inv"):
                    continue  # consumed with its weight
                lm = _LAYER.match(name)
                if (
                    lm
                    and int(lm.group(1)) >= args.num_hidden_layers
                    and args.num_nextn_predict_layers
                ):
                    skipped_mtp += 1
                    continue
                tensor = f.get_tensor(name)
                if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                    if name + "_scale_inv" not in available:
                        raise ValueError(f"{fname}: FP8 tensor {name} has no {name}_scale_inv")
                    tensor = _dequantize_fp8(tensor, f.get_tensor(name + "_scale_inv"), block)
                _copy_in(params, filled, name, tensor, fname)
    if skipped_mtp:
        log.warning(
            "skipped %d multi-token-prediction tensors (layers >= %d): this policy has "
            "no MTP block",
            skipped_mtp,
            args.num_hidden_layers,
        )
    missing = [n for n in _expected_names(model) if n not in filled]
    if missing:
        shown = ", ".join(_hf_name(*m) for m in missing[:5])
        raise ValueError(
            f"{directory}: checkpoint is missing {len(missing)} tensors: {shown}"
            + (" ..." if len(missing) > 5 else "")
        )
    return model


def _hf_name(param: str, expert: int | None) -> str:
    if expert is None:
        return param
    m = _EXPERT_PARAM.match(param)
    return f"{m.group(1)}.{expert}.{m.group(2)}.weight"


def _expected_names(model: Transformer) -> list[tuple[str, int | None]]:
    out: list[tuple[str, int | None]] = []
    for name, t in model.state_dict().items():
        if _EXPERT_PARAM.match(name):
            out.extend((name, e) for e in range(t.shape[0]))
        else:
            out.append((name, None))
    return out


def _copy_in(
    params: dict[str, torch.Tensor], filled: set, name: str, tensor: torch.Tensor, fname: str
) -> None:
    m = _EXPERT_HF.match(name)
    key, expert = (f"{m.group(1)}.{m.group(3)}", int(m.group(2))) if m else (name, None)
    if key not in params:
        raise ValueError(f"{fname}: unexpected tensor {name} (no such parameter in this model)")
    target = params[key]
    if expert is not None:
        if expert >= target.shape[0]:
            raise ValueError(
                f"{fname}: tensor {name}: expert {expert} >= n_routed_experts {target.shape[0]}"
            )
        target = target[expert]
    if tuple(tensor.shape) != tuple(target.shape):
        raise ValueError(
            f"{fname}: tensor {name} has shape {list(tensor.shape)}, the config "
            f"implies {list(target.shape)}"
        )
    with torch.no_grad():
        target.copy_(tensor)
    filled.add((key, expert))
