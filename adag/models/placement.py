"""Where a model's weights go: one device, or whole decoder layers spread over the visible GPUs."""

from __future__ import annotations

import torch
from accelerate import infer_auto_device_map
from accelerate.utils import get_balanced_memory, get_max_memory
from transformers import AutoModelForCausalLM, PretrainedConfig

from adag.errors import AdagError

AUTO = "auto"
# Tracing keeps every layer's activations for the backward passes; leave a fifth of each GPU for them.
ACTIVATION_HEADROOM = 0.2

DeviceMap = dict[str, int | str]


def available_devices() -> list[str]:
    """The device names that work on this machine, for error messages."""
    names = ["cpu"]
    accelerator = torch.accelerator.current_accelerator()
    if accelerator is not None:
        count = torch.accelerator.device_count()
        names += [accelerator.type] + [f"{accelerator.type}:{index}" for index in range(count)]
    return [*names, AUTO]


def resolve_device(device: str) -> torch.device | str:
    """Check a device name and that this machine has it, before any weights are read.

    Returns a torch.device, or "auto" for layers spread over the visible GPUs.
    """
    if device == AUTO:
        return AUTO
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise AdagError(f"unknown device '{device}'; use one of: {', '.join(available_devices())}") from None
    if parsed.type == "cpu":
        return parsed
    accelerator = torch.accelerator.current_accelerator()
    index = parsed.index or 0
    if accelerator is None or accelerator.type != parsed.type or index >= torch.accelerator.device_count():
        raise AdagError(
            f"device '{device}' is not available on this machine; use one of: {', '.join(available_devices())}"
        )
    return parsed


def accelerator_memory() -> dict[int | str, int]:
    """Bytes each visible GPU can give the weights (free memory less the activation headroom);
    the machine's memory as "cpu" when there is no GPU."""
    free = get_max_memory()
    gpus = {key: int(value * (1 - ACTIVATION_HEADROOM)) for key, value in free.items() if isinstance(key, int)}
    return gpus or {"cpu": int(free.get("cpu", 0))}


def device_map_for(target: torch.device | str, config: PretrainedConfig, dtype: torch.dtype) -> DeviceMap:
    """Everything on one device, or for "auto" whole layers spread over the visible GPUs."""
    if target == AUTO:
        return plan_device_map(config, dtype, accelerator_memory())
    return {"": str(target)}


def plan_device_map(config: PretrainedConfig, dtype: torch.dtype, max_memory: dict[int | str, int]) -> DeviceMap:
    """Spread whole decoder layers over the devices of `max_memory` (GPU indices, or "cpu").

    The plan is made on a weightless copy of the model, so it costs no memory. Layers are balanced over
    the devices when that fits, else packed in order. Tied weights (the input embeddings and lm_head of
    most small models) stay on one device. A model that does not fit is an error rather than a silent,
    slow offload to the CPU or disk.
    """
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype)
    no_split = list(skeleton._no_split_modules or [])
    budgets = [get_balanced_memory(skeleton, dict(max_memory), no_split_module_classes=no_split), dict(max_memory)]
    for budget in budgets:
        device_map = dict(infer_auto_device_map(skeleton, max_memory=budget, no_split_module_classes=no_split))
        if set(device_map.values()) <= set(max_memory):
            return device_map
    needed = sum(p.numel() * p.element_size() for p in skeleton.parameters())
    devices = ", ".join(f"{device}: {_size(free)}" for device, free in max_memory.items())
    raise AdagError(f"the model's weights need {_size(needed)} but do not fit the devices' free memory ({devices}); "
                    "use more GPUs or --dtype bfloat16")


def _size(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.1f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.1f} MiB"
