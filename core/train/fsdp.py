"""distributed.strategy FSDP: the transformer sharded across the processes with torch's FSDP2, through
accelerate's FSDP plugin (docs/training.md, "Sharded training (FSDP)").

accelerate does the sharding: `Accelerator(fsdp_plugin=...)` and `prepare(model, optimizer)` run its
fsdp2_prepare_model, which wraps each block (the classes of the adapter's block_stacks, through the
plugin's transformer_cls_names_to_wrap) and then the whole model with `fully_shard`, and upcasts the
trained weights to float32 under mixed precision (its master weights). accelerate 1.16 switches to
FSDP only on GPU-like backends (AcceleratorState leaves a CPU job MULTI_CPU), while FSDP2 itself runs
on CPU processes over gloo; `enter_fsdp` puts a CPU job's state where a GPU job's is, so the very same
accelerate code (prepare, clipping, gathering) runs in the two-CPU-process tests as on GPUs.

The model for the final save is gathered here, with a collective every process joins: a copy on the
meta device that takes the gathered tensors, saved by the method's usual writer in today's formats.
Backups are not gathered: every process writes its shards (core/train/fsdp_backup.py).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from core.errors import ConfigError
from core.memory.quantize import is_quantized_dtype

log = logging.getLogger(__name__)


def fsdp_requested(config: Mapping[str, Any]) -> bool:
    return config["distributed"]["strategy"] == "FSDP"


def fsdp_refusals(config: Mapping[str, Any], denoiser_count: int | None = None) -> list[ConfigError]:
    """What cannot combine with distributed.strategy FSDP, each naming its keys. denoiser_count: how
    many denoisers the run trains (None: not known yet)."""
    if not fsdp_requested(config):
        return []
    out: list[ConfigError] = []

    def refuse(key: str, why: str, fix: str) -> None:
        out.append(ConfigError(f"distributed.strategy FSDP cannot combine with {key} {why}; {fix}, or use "
                               "distributed.strategy DDP", key="distributed.strategy", also=(key,)))

    method = config["training_method"]
    if method == "EMBEDDING":
        refuse("training_method", "EMBEDDING (the transformer is frozen, nothing to shard the training of)",
               "train with LORA or FINE_TUNE")
    if config["layer_offload_fraction"] > 0:
        refuse("layer_offload_fraction", f"{config['layer_offload_fraction']:g} (the offloader streams whole blocks, "
               "FSDP holds a shard of each)", "set it to 0 (sharding is what saves the memory)")
    if method == "FINE_TUNE" and config["fused_backward"]:
        refuse("fused_backward", "(it steps each weight inside the backward pass, before FSDP has reduced the "
               "gradient shards)", "turn it off")
    dtype = config["transformer"]["weight_dtype"]
    if is_quantized_dtype(dtype):
        refuse("transformer.weight_dtype", f"{dtype} (packed quantized tensors cannot be split into shards)",
               "choose BFLOAT_16 or FLOAT_32")
    trained_encoders = [k for k, v in config.items() if k.startswith("text_encoder") and isinstance(v, dict) and v.get("train")]
    if method == "FINE_TUNE" and trained_encoders:
        refuse(f"{trained_encoders[0]}.train", "(only the transformer is sharded)", "turn it off")
    if config["ema"]["enabled"]:
        refuse("ema.enabled", "(the average would need every weight whole in one process)", "turn it off")
    if config["validation"]["every_n_steps"] > 0:
        refuse("validation.every_n_steps", "(validation runs the model in the main process alone)", "set it to 0")
    if config["sampling"]["prompts"]:
        refuse("sampling.prompts", "(samples run the model in the main process alone)",
               "clear them and sample from the saved result")
    if denoiser_count is not None and denoiser_count > 1:
        refuse("experts.train", f"BOTH ({denoiser_count} denoisers; accelerate's FSDP2 prepares one model)",
               "train HIGH_NOISE and LOW_NOISE in two runs")
    return out


def fsdp_plugin(config: Mapping[str, Any]) -> Any:
    """accelerate's FSDP2 plugin for these settings; the block classes to wrap are set by `wrap_blocks`
    once the model is loaded."""
    from accelerate import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        # FULL_SHARD (and HYBRID_SHARD within a machine) frees each block's gathered parameters after
        # its forward; SHARD_GRAD_OP keeps them.
        reshard_after_forward=config["distributed"]["sharding"] != "SHARD_GRAD_OP",
        auto_wrap_policy="transformer_based_wrap",
        # Every process loads the weights it is given (the same files); no meta-device loading.
        cpu_ram_efficient_loading=False,
        state_dict_type="FULL_STATE_DICT",
    )


def launched_machines() -> int:
    """Machines of this launch: torch elastic's WORLD_SIZE / LOCAL_WORLD_SIZE (the same process count on each)."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    return max(1, world // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))))


def hybrid_parallelism(config: Mapping[str, Any]) -> Any:
    """HYBRID_SHARD across machines: accelerate's ParallelismConfig, the model replicated across the
    machines (dp_replicate) and sharded over each machine's processes (dp_shard); None for another
    sharding, or on one machine (where HYBRID_SHARD is FULL_SHARD)."""
    import os

    if config["distributed"]["sharding"] != "HYBRID_SHARD" or launched_machines() < 2:
        return None
    from accelerate import ParallelismConfig

    machines = launched_machines()
    return ParallelismConfig(dp_replicate_size=machines, dp_shard_size=int(os.environ["WORLD_SIZE"]) // machines)


def enter_fsdp(accelerator: Any, plugin: Any, parallelism: Any = None) -> bool:
    """Whether this run shards: several processes and the plugin given. A CPU job (accelerate 1.16:
    MULTI_CPU even with an FSDP plugin, AcceleratorState ~line 947) gets the state a GPU job gets
    there: distributed type FSDP, the plugin with the run's mixed precision and, for HYBRID_SHARD, the
    device mesh of `parallelism` (which a GPU job's Accelerator was given; a CPU job's refuses it)."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        return True
    if kind != DistributedType.MULTI_CPU:
        return False  # one process: nothing to shard across
    state = AcceleratorState()
    _entered.append(kind)
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    state.fsdp_plugin = plugin
    if parallelism is not None:
        state.parallelism_config = parallelism
        state.device_mesh = parallelism.get_device_mesh("cpu")
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return True


def leave_fsdp() -> None:
    """After a run: undo what enter_fsdp and accelerate's FSDP plugin left process-wide (the CPU job's
    distributed type, the ACCELERATE_USE_FSDP variable Accelerator sets), so a later run in the same
    process starts from what the launcher set."""
    import os

    from accelerate.state import PartialState

    if _entered:
        PartialState._shared_state["distributed_type"] = _entered.pop()
    if _env_before:
        previous = _env_before.pop()
        if previous is None:
            os.environ.pop("ACCELERATE_USE_FSDP", None)
        else:
            os.environ["ACCELERATE_USE_FSDP"] = previous


def remember_environment() -> None:
    """Before Accelerator(fsdp_plugin=...): the ACCELERATE_USE_FSDP value it will overwrite."""
    import os

    _env_before.append(os.environ.get("ACCELERATE_USE_FSDP"))


_entered: list[Any] = []  # the distributed type enter_fsdp replaced (at most one entry)
_env_before: list[str | None] = []


def wrap_blocks(accelerator: Any, blocks: list[Any]) -> list[str]:
    """Tell the plugin which classes are the blocks (each wrapped on its own): the classes of the
    modules in the adapter's block stacks."""
    names = sorted({type(block).__name__ for stack in blocks for block in stack})
    accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap = names
    return names


def parameter_counts(model: Any) -> tuple[int, int]:
    """(parameters this process holds, parameters of the whole model): FSDP's DTensor parameters
    count their local shard."""
    from torch.distributed.tensor import DTensor

    whole = local = 0
    for p in model.parameters():
        whole += p.numel()
        local += p.to_local().numel() if isinstance(p, DTensor) else p.numel()
    return local, whole


def _full(value: Any) -> Any:
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def gather_tensors(named: Mapping[str, Any], is_main: bool) -> dict[str, Any]:
    """Every tensor whole (a collective: every process calls it with the same names in the same
    order); on the main process as CPU tensors, elsewhere an empty dict."""
    out = {}
    for name, value in named.items():
        whole = _full(value.detach())
        if is_main:
            out[name] = whole.cpu()
        del whole
    return out


def unsharded_class(model: Any) -> type:
    """The model's own class: fully_shard makes the instance's class a subclass FSDP<name>."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))


def whole_copy(model: Any, dtypes: Mapping[str, Any], is_main: bool, *, trained_only: bool) -> Any:
    """A copy of a sharded model with its weights whole, on the main process (None elsewhere), for the
    method's writer to save as it saves an unsharded model. A collective. trained_only (LORA): only
    the trained tensors are gathered and the frozen base stays on the meta device, which the LoRA
    writer never reads. dtypes: each state-dict entry's dtype before sharding (the FSDP upcast to
    float32 master weights is undone, so the files are what an unsharded run writes)."""
    import torch

    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    state = {k: v for k, v in model.state_dict().items() if not trained_only or k in trained}
    whole = gather_tensors(state, is_main)
    if not is_main:
        return None
    whole = {k: v.to(dtypes.get(k, v.dtype)) for k, v in whole.items()}
    with torch.device("meta"):
        copy = unsharded_class(model).from_config(model.config)
        for name, peft_config in getattr(model, "peft_config", {}).items():
            copy.add_adapter(peft_config, adapter_name=name)
    missing, unexpected = copy.load_state_dict(whole, strict=False, assign=True)
    if unexpected or (missing and not trained_only):
        raise RuntimeError(f"the gathered weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return copy


def shard_denoiser(accelerator: Any, adapter: Any, transformers: list[Any], optimizer: Any,
                   sharding: str) -> tuple[list[Any], Any, dict[str, Any], dict[str, Any]]:
    """The one trained denoiser (fsdp_refusals) and its optimizer prepared together by accelerate,
    each block wrapped on its own. Also returned: the state dict's dtypes before sharding (the save
    restores them) and, for run_info.json, what each process holds: the proof that it is sharded."""
    import torch

    import warnings

    (transformer,) = transformers
    # FSDP2 warns, on every process and every run, that the model returns a view (diffusers' final
    # reshape) which an in-place op would detach from its backward hook. The loss never changes the
    # prediction in place (objective.training_loss), and tests/test_fsdp.py pins the sharded run's
    # weights to the one-process run's; the warning would only tell users of a problem they do not have.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor", category=UserWarning)
    blocks = wrap_blocks(accelerator, adapter.block_stacks(transformer))
    dtypes = {name: value.dtype for name, value in transformer.state_dict().items()}
    transformer, optimizer = accelerator.prepare(transformer, optimizer)
    local, whole = parameter_counts(transformer)
    held = accelerator.gather(torch.tensor([local], device=accelerator.device)).tolist()
    log.info("FSDP over %d processes: %s wrapped one by one; the processes hold %s of %d parameters",
             accelerator.num_processes, ", ".join(blocks), held, whole)
    info = {"sharding": sharding, "wrapped": blocks, "parameters": whole, "parameters_per_process": held}
    return [transformer], optimizer, dtypes, info


def gather_for_saving(run: Any, models: list[Any], dtypes: Mapping[str, Any], *, trained_only: bool) -> list[Any]:
    """The trained models whole on the main process (every process joins the gathering), put in the
    run's parts, whose writer then saves them as it saves an unsharded run's. run: loop.RunParts."""
    main = run.accelerator.is_main_process
    copies = [whole_copy(m, dtypes, main, trained_only=trained_only) for m in models]
    if main:
        run.parts.use_transformers(copies)  # what save_result checks (finite weights) and saves
    return copies
