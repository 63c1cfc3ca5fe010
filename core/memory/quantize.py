"""Quantized frozen weights: weight_dtype FLOAT_8, INT_8, INT_4 (optimum-quanto) and NFLOAT_4 (bitsandbytes).

Order in a run: load the transformer (compute dtype: bfloat16 for every quantized type), quantize it
here, then add the LoRA (peft wraps the quantized layers and trains in float32 on top of them).

- Which layers: the model family names them (ModelAdapter.quantize_filter: a LayerFilter, a name
  pattern per model part), because families call their blocks differently (`blocks.N`,
  `transformer_blocks.N`, two stacks of dual- and single-stream blocks). Without one, every nn.Linear inside
  the module's top-level nn.ModuleLists (its block stacks, whatever they are called): about 98% of
  a real video transformer's weights. The patch embedding, the condition embedder, the norms and
  proj_out stay in the compute dtype: small, and sensitive to rounding. A choice that matches no
  layer is an error: quantizing nothing would train in full precision while the settings say otherwise.
- FLOAT_8 / INT_8: one byte per weight plus one scale per output row (quanto qfloat8_e4m3fn / qint8).
  INT_4: quanto qint4, two weights per byte with a scale and a shift per group of up to 128 inputs.
  NFLOAT_4: bitsandbytes Linear4bit, quant_type nf4, blocks of 64 with double-quantized absmax.
- After quantizing, every parameter of the module is frozen: quanto leaves requires_grad=True on
  its frozen weights, and a frozen base is what LoRA training needs.
- The module gets `is_loaded_in_4bit = True` after NFLOAT_4 so that peft wraps Linear4bit layers
  with its bitsandbytes-aware LoRA layer (which clones the 4-bit matmul's output before adding to it).

Fusing a LoRA into quantized weights is refused (quanto's tensors ignore the in-place add peft's
merge does, so it would silently do nothing): see fuse_lora_refusal and merged_copy.
The on-disk cache of quantized weights is in quantize_cache.py.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from core.errors import ConfigError, UserError

log = logging.getLogger(__name__)

QUANTIZED_WEIGHT_DTYPES = ("FLOAT_8", "INT_8", "INT_4", "NFLOAT_4")
QUANTO_QTYPES = {"FLOAT_8": "qfloat8", "INT_8": "qint8", "INT_4": "qint4"}
NF4_BLOCKSIZE = 64  # bitsandbytes' default and QLoRA's choice
# torch's CPU kernel for int8 weights with bfloat16 inputs (torch._weight_int8pack_mm, which quanto
# calls on CPU) crashes the process for input widths that are not a multiple of 16 (seen with torch
# 2.13); real models' widths all are. Such layers are left unquantized for INT_8 and reported.
INT8_CPU_WIDTH_MULTIPLE = 16

Include = Callable[[str, Any], bool]
DEFAULT_FILTER_IDENTITY = "nn.Linear in the top-level nn.ModuleLists"


@dataclass(frozen=True)
class LayerFilter:
    """The Linear layers of one model part to quantize, as its family names them.

    pattern: a regular expression the layer's full module name must match (re.fullmatch); exclude:
    one it must not match. Names rather than an arbitrary predicate, so that the choice has a
    stable identity for the quantization cache's key (a changed filter never reuses a stale file).
    family, part and setting name the error when the pattern matches nothing.
    """

    family: str
    part: str  # the model component: "transformer", "transformer_2", "text_encoder"
    pattern: str
    exclude: str | None = None
    setting: str | None = None  # the settings key of its weight_dtype; default f"{part}.weight_dtype"

    def __call__(self, name: str, module: Any) -> bool:
        import torch

        if not isinstance(module, torch.nn.Linear) or re.fullmatch(self.pattern, name) is None:
            return False
        return self.exclude is None or re.fullmatch(self.exclude, name) is None

    @property
    def identity(self) -> str:
        return json.dumps({"pattern": self.pattern, "exclude": self.exclude}, sort_keys=True)

    @property
    def key(self) -> str:
        return self.setting or f"{self.part}.weight_dtype"


@dataclass
class QuantizeReport:
    """What quantize_model did. Byte counts are part_summary's weight_bytes of the whole module."""

    weight_dtype: str
    quantized: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # layer name -> why it was left as it was
    bytes_before: int = 0
    bytes_after: int = 0
    seconds: float = 0.0
    from_cache: bool = False

    def summary(self) -> str:
        ratio = self.bytes_after / self.bytes_before if self.bytes_before else 1.0
        source = " (from the cache)" if self.from_cache else ""
        text = (f"{self.weight_dtype}: {len(self.quantized)} layers quantized{source}, weights "
                f"{self.bytes_before / 2**20:.1f} MiB -> {self.bytes_after / 2**20:.1f} MiB ({ratio:.0%}) in {self.seconds:.1f} s")
        if self.skipped:
            text += f"; {len(self.skipped)} layers left unquantized"
        return text


def is_quantized_dtype(weight_dtype: str) -> bool:
    return weight_dtype in QUANTIZED_WEIGHT_DTYPES


def stack_linear_layers(module: Any) -> set[str]:
    """The default choice: names of the nn.Linear layers inside module's top-level nn.ModuleLists
    (`blocks.N....`, `transformer_blocks.N....`, or every stack of a model with several)."""
    import torch

    names = set()
    for child_name, child in module.named_children():
        if isinstance(child, torch.nn.ModuleList):
            names.update(f"{child_name}.{n}" for n, sub in child.named_modules() if n and isinstance(sub, torch.nn.Linear))
    return names


def select_layers(module: Any, include: Include | None = None) -> list[str]:
    """Names of the nn.Linear layers of module that quantize_model would quantize."""
    import torch

    stacked = stack_linear_layers(module) if include is None else set()
    return [name for name, sub in module.named_modules()  # exactly Linear: not already quantized
            if type(sub) is torch.nn.Linear and (name in stacked if include is None else include(name, sub))]


def filter_identity(include: Include | None) -> str:
    """What the quantization cache's key records of a layer choice."""
    if include is None:
        return DEFAULT_FILTER_IDENTITY
    if isinstance(include, LayerFilter):
        return include.identity
    # A bare predicate has no stable identity; its qualified name is the best there is (the layer
    # names chosen are in the key as well).
    return f"callable:{getattr(include, '__module__', '')}.{getattr(include, '__qualname__', type(include).__name__)}"


def require_layers(names: list[str], include: Include | None, weight_dtype: str) -> None:
    """Refuse a quantization that would quantize nothing: the run would hold full-precision weights
    while its settings say weight_dtype, and a VRAM budget planned on them would not hold."""
    if names:
        return
    if isinstance(include, LayerFilter):
        raise ConfigError(
            f"{include.key} {weight_dtype}: the {include.family} adapter's layer filter ({include.pattern}) matches no "
            f"nn.Linear layer of the {include.part}, so nothing would be quantized; the model's layout is not what "
            f"the {include.family} adapter expects (a bug to report, with the model's config.json); use BFLOAT_16 meanwhile",
            key=include.key,
        )
    what = "the given layer filter" if include is not None else "no top-level nn.ModuleList holding nn.Linear layers"
    raise UserError(f"weight_dtype {weight_dtype}: {what} matches no nn.Linear layer of the model, so nothing would be "
                    "quantized; name the layers to quantize (a LayerFilter) or use BFLOAT_16")


def _refuse_lora_present(module: Any) -> None:
    if getattr(module, "peft_config", None):
        raise ValueError("quantize the model before adding the LoRA: peft's layers must wrap the quantized ones")


def quantize_model(module: Any, weight_dtype: str, *, include: Include | None = None, work_device: Any = None) -> QuantizeReport:
    """Quantize module's chosen Linear layers in place to weight_dtype and freeze every parameter.

    include(name, layer) -> bool chooses the layers: the family's LayerFilter, or by default every
    Linear in the top-level ModuleLists (stack_linear_layers); matching none raises
    (require_layers). work_device is
    where NFLOAT_4 quantization computes (bitsandbytes quantizes when a layer is moved; on a CPU
    it is slow, about 10 M weights per second); the layers stay where they were. The quanto types
    quantize where the weights are. Raises UserError if the library a type needs is missing.
    """
    from core.memory.storage import part_summary

    if not is_quantized_dtype(weight_dtype):
        raise ValueError(f"{weight_dtype} is not a quantized weight_dtype ({', '.join(QUANTIZED_WEIGHT_DTYPES)})")
    _refuse_lora_present(module)
    started = time.perf_counter()
    report = QuantizeReport(weight_dtype, bytes_before=part_summary(module)["weight_bytes"])
    names = select_layers(module, include)
    require_layers(names, include, weight_dtype)
    if weight_dtype == "NFLOAT_4":
        report.quantized = _quantize_nf4(module, names, work_device)
        module.is_loaded_in_4bit = True  # peft then picks its bitsandbytes LoRA layer
    else:
        names, report.skipped = _quanto_candidates(module, names, weight_dtype)
        _quantize_quanto(module, names, weight_dtype)
        report.quantized = names
    module.requires_grad_(False)
    report.bytes_after = part_summary(module)["weight_bytes"]
    report.seconds = time.perf_counter() - started
    log.info("%s", report.summary())
    if report.skipped:
        name, why = next(iter(report.skipped.items()))
        log.warning("%d layers left unquantized, e.g. %s: %s", len(report.skipped), name, why)
    return report


def _quanto_candidates(module: Any, names: list[str], weight_dtype: str) -> tuple[list[str], dict[str, str]]:
    if weight_dtype != "INT_8":
        return names, {}
    keep, skipped = [], {}
    for name in names:
        width = module.get_submodule(name).in_features
        if width % INT8_CPU_WIDTH_MULTIPLE:
            skipped[name] = (f"its input width {width} is not a multiple of {INT8_CPU_WIDTH_MULTIPLE}, which crashes "
                             "torch's CPU int8 kernel")
        else:
            keep.append(name)
    return keep, skipped


def _import_quanto() -> Any:
    try:
        from optimum import quanto
    except ImportError as e:
        raise UserError(f"transformer.weight_dtype FLOAT_8/INT_8/INT_4 needs optimum-quanto, which cannot be imported ({e}); "
                        "install it (pip install optimum-quanto) or use BFLOAT_16") from None
    return quanto


def _import_bnb() -> Any:
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise UserError(f"transformer.weight_dtype NFLOAT_4 needs bitsandbytes, which cannot be imported ({e}); "
                        "install it (pip install bitsandbytes) or use FLOAT_8") from None
    return bnb


def _quantize_quanto(module: Any, names: list[str], weight_dtype: str) -> None:
    if not names:
        return
    quanto = _import_quanto()
    qtype = getattr(quanto, QUANTO_QTYPES[weight_dtype])
    # Exact names, escaped: quanto's include patterns are fnmatch wildcards.
    quanto.quantize(module, weights=qtype, include=[re.sub(r"([\[\]*?])", r"[\1]", n) for n in names])
    quanto.freeze(module)


def _parent(module: Any, name: str) -> tuple[Any, str]:
    parent_name, _, child = name.rpartition(".")
    return (module.get_submodule(parent_name) if parent_name else module), child


def _quantize_nf4(module: Any, names: list[str], work_device: Any) -> list[str]:
    import torch

    bnb = _import_bnb() if names else None
    for name in names:
        layer = module.get_submodule(name)
        home = layer.weight.device
        device = torch.device(work_device) if work_device is not None else home
        q = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=layer.bias is not None,
                              compute_dtype=layer.weight.dtype, compress_statistics=True, quant_type="nf4", device="meta")
        q.weight = bnb.nn.Params4bit(layer.weight.data, requires_grad=False, blocksize=NF4_BLOCKSIZE,
                                     compress_statistics=True, quant_type="nf4", module=q)
        if layer.bias is not None:
            q.bias = torch.nn.Parameter(layer.bias.data, requires_grad=False)
        # bitsandbytes 0.50 repacks 4-bit weights in place into a CPU-only layout on the first CPU
        # inference forward; that would change the storage the offloader and the cache move around.
        q.support_avx512bf16_for_cpu = False
        q = q.to(device)  # bitsandbytes quantizes here
        if device != home:
            q = q.to(home)
        q.train(layer.training)
        parent, child = _parent(module, name)
        setattr(parent, child, q)
    return names


# --------------------------------------------------------------------------------------------------
# What export does with a LoRA over quantized weights


def quantized_layer_names(module: Any) -> list[str]:
    """Names of the modules whose weights are quantized (quanto or bitsandbytes), LoRA wrappers aside."""
    return [name for name, sub in module.named_modules() if _is_quantized_layer(sub)]


def _is_quantized_layer(layer: Any) -> bool:
    weight = getattr(layer, "weight", None)
    if weight is None or not hasattr(layer, "in_features"):
        return False
    if getattr(layer, "base_layer", None) is not None:
        return False  # a peft LoRA wrapper: its base layer is counted instead
    if getattr(layer, "weight_qtype", None) is not None:  # quanto QModuleMixin
        return True
    return getattr(weight, "quant_state", None) is not None or getattr(weight, "SCB", None) is not None


def fuse_lora_refusal(module: Any, key: str = "transformer.weight_dtype") -> str | None:
    """None if a LoRA can be merged into module's own weights; else the one-line reason it cannot.

    Merging into quantized storage either does nothing (quanto ignores peft's in-place add) or
    re-quantizes the merged weights (bitsandbytes), so the result would not be the trained model.
    Export instead merges into a dequantized copy (merged_copy).
    """
    quantized = quantized_layer_names(module)
    if not quantized:
        return None
    return (f"cannot merge the LoRA into {len(quantized)} quantized layers ({key} is quantized, e.g. {quantized[0]}); "
            f"save the LoRA on its own, or merge into a dequantized copy of the model")


def dequantized_weight(layer: Any, dtype: Any = None) -> Any:
    """The full-precision weight of a Linear-like layer, quantized (quanto, bitsandbytes NF4/FP4) or not."""
    weight = layer.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:
        import bitsandbytes as bnb

        full = bnb.functional.dequantize_4bit(weight.data, quant_state)
    elif hasattr(weight, "dequantize") and getattr(layer, "weight_qtype", None) is not None:
        full = weight.dequantize()
    else:
        full = weight.detach()
    return full if dtype is None else full.to(dtype)


def merged_copy(module: Any, dtype: Any = None) -> Any:
    """A copy of module with every LoRA merged into plain, dequantized nn.Linear layers.

    The original (quantized, with its LoRA) is untouched. Each peft LoRA layer becomes an nn.Linear
    holding dequantize(base) + the LoRA's delta (peft's get_delta_weight, so scaling and fan_in_fan_out
    follow peft), in dtype (default: the copy's compute dtype, bfloat16 for quantized bases). Other
    quantized layers are dequantized too. Needs the memory of a full-precision copy: do it on a CPU.
    """
    import torch
    from peft.tuners.lora import LoraLayer

    # Quantized tensors are shared with the original, not copied (quanto's cannot be deep-copied):
    # every layer holding one is replaced in the copy, and neither is changed.
    shared = {id(sub.weight): sub.weight for sub in module.modules() if _is_quantized_layer(sub)}
    clone = copy.deepcopy(module, memo=shared)
    for name, layer in list(clone.named_modules()):
        if not name or not isinstance(layer, LoraLayer):
            continue
        base = layer.get_base_layer()
        weight = dequantized_weight(base).float()
        for adapter in layer.active_adapters:
            if adapter in layer.lora_A:
                weight = weight + layer.get_delta_weight(adapter).float().to(weight.device)
        _replace_with_linear(clone, name, base, weight, dtype)
    for name in quantized_layer_names(clone):
        base = clone.get_submodule(name)
        _replace_with_linear(clone, name, base, dequantized_weight(base).float(), dtype)
    for attribute in ("peft_config", "is_loaded_in_4bit"):
        if attribute in vars(clone):
            delattr(clone, attribute)
    if hasattr(clone, "_hf_peft_config_loaded"):
        clone._hf_peft_config_loaded = False
    torch.nn.Module.requires_grad_(clone, False)
    return clone


def _replace_with_linear(root: Any, name: str, base: Any, weight: Any, dtype: Any) -> None:
    import torch

    target = dtype or _compute_dtype_of(base)
    linear = torch.nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
    linear.weight = torch.nn.Parameter(weight.to(target), requires_grad=False)
    if base.bias is not None:
        linear.bias = torch.nn.Parameter(base.bias.detach().to(target), requires_grad=False)
    parent, child = _parent(root, name)
    setattr(parent, child, linear)


def _compute_dtype_of(layer: Any) -> Any:
    import torch

    compute = getattr(layer, "compute_dtype", None)  # bitsandbytes
    if compute is not None:
        return compute
    weight = layer.weight
    dtype = getattr(weight, "dtype", None)
    return dtype if dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.bfloat16
