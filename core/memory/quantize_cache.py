"""The on-disk cache of a quantized model part, so that only the first run pays for quantizing.

A cache file is one .safetensors holding the part's whole state dict after quantize_model (quantized
layers as quanto's `weight._data` / `weight._scale` or bitsandbytes' packed weight plus its quant
state, everything else in its loaded dtype), with a header naming the weight_dtype and the layers.
Loading it builds the model from its config.json with empty weights (accelerate's
init_empty_weights: parameters on the meta device, buffers real), swaps in the quantized layer
classes and assigns the stored tensors, so the full-precision weights are never read.

The file name carries a key over: the model folder's identity (core.identity.folder_identity:
its config and the digests of its weight files), the weight_dtype, the layer filter's identity (the
family's name pattern: a changed filter never reuses a file quantized under the old one), the
quantized layer names, and the major.minor versions of torch and the quantizing library (their storage formats are what is
stored). Any change gives a new name; old files are left for the user to delete with the cache.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from core.atomic import write_bytes_atomic
from core.errors import UserError

from .quantize import (
    QUANTO_QTYPES,
    Include,
    QuantizeReport,
    _import_bnb,
    _import_quanto,
    _parent,
    filter_identity,
    quantize_model,
    require_layers,
    select_layers,
)

log = logging.getLogger(__name__)

CACHE_SUBFOLDER = "quantized"
HEADER_KEY = "video_trainer.quantized"
FORMAT_VERSION = 1


def _library(weight_dtype: str) -> str:
    return "bitsandbytes" if weight_dtype == "NFLOAT_4" else "optimum-quanto"


def _major_minor(distribution: str) -> str:
    try:
        return ".".join(importlib.metadata.version(distribution).split(".")[:2])
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def quantized_cache_path(cache_dir: str | os.PathLike, component_folder: str | os.PathLike, weight_dtype: str,
                         layer_names: list[str], layer_filter: str = "") -> Path:
    """Where the quantized state of the model part in component_folder (e.g. MODEL/transformer) goes;
    layer_filter is the identity of the layer choice (quantize.filter_identity)."""
    from core.identity import folder_identity

    folder = Path(component_folder)
    identity = folder_identity(f"quantized-{folder.name}", folder)
    key = json.dumps({
        "format": FORMAT_VERSION,
        "identity": identity,
        "weight_dtype": weight_dtype,
        "filter": layer_filter,
        "layers": sorted(layer_names),
        "torch": _major_minor("torch"),
        "library": _major_minor(_library(weight_dtype)),
    }, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    return Path(cache_dir).expanduser() / CACHE_SUBFOLDER / f"{folder.name}-{weight_dtype.lower()}-{digest}.safetensors"


def save_quantized(module: Any, path: str | os.PathLike, weight_dtype: str, layer_names: list[str]) -> Path:
    """Write module's state dict (after quantize_model) to path, atomically."""
    from safetensors.torch import save

    state = {key: tensor.detach().to("cpu").contiguous() for key, tensor in module.state_dict().items()}
    header = {HEADER_KEY: json.dumps({"format": FORMAT_VERSION, "weight_dtype": weight_dtype, "layers": layer_names})}
    # The whole file is built in memory first (write_bytes_atomic takes bytes): the peak is the
    # quantized part's size once more, which is what its GPU copy will take anyway.
    return write_bytes_atomic(path, save(state, metadata=header))


def load_quantized(model_class: Any, config: dict[str, Any], path: str | os.PathLike) -> tuple[Any, list[str], str]:
    """(module, quantized layer names, weight_dtype) rebuilt from a cache file, on the CPU, frozen."""
    import torch
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as handle:
        header = json.loads((handle.metadata() or {})[HEADER_KEY])
    weight_dtype, names = header["weight_dtype"], list(header["layers"])
    state = load_file(str(path))
    with init_empty_weights():
        module = model_class.from_config(config)
    if weight_dtype == "NFLOAT_4":
        _rebuild_nf4(module, names, state)
        module.is_loaded_in_4bit = True
    else:
        quanto = _import_quanto()
        quanto.quantize(module, weights=getattr(quanto, QUANTO_QTYPES[weight_dtype]), include=names)
    result = module.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise ValueError(f"unexpected tensors in {path}: {result.unexpected_keys[:3]}")
    empty = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.device.type == "meta"]
    if empty:
        raise ValueError(f"{path} lacks {len(empty)} tensors, e.g. {empty[0]}")
    torch.nn.Module.requires_grad_(module, False)
    module.eval()
    return module, names, weight_dtype


def _rebuild_nf4(module: Any, names: list[str], state: dict[str, Any]) -> None:
    import torch

    bnb = _import_bnb()
    for name in names:
        layer = module.get_submodule(name)
        prefix = f"{name}.weight."
        stats = {key[len(prefix):]: state.pop(key) for key in [k for k in state if k.startswith(prefix)]}
        data = state.pop(f"{name}.weight")
        bias = state.pop(f"{name}.bias", None)
        q = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=bias is not None, quant_type="nf4", device="meta")
        q.support_avx512bf16_for_cpu = False  # see quantize._quantize_nf4
        q.weight = bnb.nn.Params4bit.from_prequantized(data, stats, requires_grad=False, device="cpu", module=q)
        q.compute_dtype = bias.dtype if bias is not None else torch.bfloat16
        if bias is not None:
            q.bias = torch.nn.Parameter(bias, requires_grad=False)
        parent, child = _parent(module, name)
        setattr(parent, child, q)


def load_quantized_part(folder: str | os.PathLike, subfolder: str, weight_dtype: str, *, cache_dir: str | os.PathLike | None,
                        compute_dtype: Any = None, include: Include | None = None, work_device: Any = None,
                        model_class: Any = None) -> tuple[Any, QuantizeReport]:
    """The diffusers model part folder/subfolder with its layers quantized to weight_dtype, on the CPU.

    With cache_dir, a cache file from an earlier run is used when it matches (nothing
    full-precision is read), else the part is loaded, quantized and the cache file written. The
    class comes from the part's config.json (`_class_name`, a diffusers class) unless given.
    compute_dtype (default bfloat16) is the dtype the unquantized parts load in. include is the
    family's LayerFilter (default: quantize.select_layers'); one that matches no layer raises
    before anything is loaded or written.
    """
    import torch

    started = time.perf_counter()
    component = Path(folder) / subfolder
    if model_class is None:
        model_class = _diffusers_class(component)
    config = model_class.load_config(component)
    compute_dtype = compute_dtype or torch.bfloat16
    path = None
    if cache_dir is not None:
        from accelerate import init_empty_weights

        with init_empty_weights():
            names = select_layers(model_class.from_config(config), include)
        require_layers(names, include, weight_dtype)
        path = quantized_cache_path(cache_dir, component, weight_dtype, names, filter_identity(include))
        if path.is_file():
            try:
                module, quantized, _ = load_quantized(model_class, config, path)
            except Exception as e:  # noqa: BLE001  (a damaged or foreign file, whatever the error: quantize again)
                log.warning("quantization cache %s is unusable (%s); quantizing again", path, e)
            else:
                from core.memory.storage import part_summary

                size = part_summary(module)["weight_bytes"]
                report = QuantizeReport(weight_dtype, quantized, bytes_before=size, bytes_after=size,
                                        seconds=time.perf_counter() - started, from_cache=True)
                log.info("%s", report.summary())
                return module, report
    module = model_class.from_pretrained(component, torch_dtype=compute_dtype)
    module.requires_grad_(False).eval()
    report = quantize_model(module, weight_dtype, include=include, work_device=work_device)
    if path is not None:
        try:
            save_quantized(module, path, weight_dtype, report.quantized)
        except OSError as e:  # a full disk costs the next run time, not this run
            log.warning("could not write the quantization cache %s: %s", path, e.strerror or e)
    report.seconds = time.perf_counter() - started
    return module, report


def _diffusers_class(component: Path) -> Any:
    config_path = component / "config.json"
    try:
        name = json.loads(config_path.read_text(encoding="utf-8"))["_class_name"]
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{config_path} cannot be read as a diffusers model config ({e}); point base_model at a diffusers model folder") from None
    import diffusers

    model_class = getattr(diffusers, name, None)
    if model_class is None:
        raise UserError(f"{config_path} names the class {name}, which this diffusers version does not have")
    return model_class
