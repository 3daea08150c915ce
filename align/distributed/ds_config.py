"""DeepSpeed JSON configs: read one, fill its ``"auto"`` values from align's trainer config, refuse contradictions.

align's ``trainer.*`` settings stay the single source of truth. Every key below may be absent or ``"auto"`` (filled
from our config, as in the Hugging Face integration) or hold the same value as ours; a different value is an error
naming both keys, so a DeepSpeed run never trains with other hyper-parameters than the config says.

    train_micro_batch_size_per_gpu  trainer.micro_batch_size
    gradient_accumulation_steps     trainer.grad_accum_steps
    train_batch_size                micro_batch_size x grad_accum_steps x world size
    gradient_clipping               trainer.optimizer.max_grad_norm (0: off)
    optimizer.params.lr/betas/eps/weight_decay  trainer.optimizer.*
    bf16.enabled, fp16.enabled      false: trainer.precision=bf16 runs under torch autocast with fp32 adapter weights
                                    and fp32 optimizer states, exactly as without DeepSpeed

``checkpoint.load_universal`` is refused (DeepSpeed reads universal checkpoints with an unrestricted pickle).
There is no ``scheduler`` section: the back-end hands DeepSpeed align's own warm-up/decay schedule. The optimizer is
AdamW: DeepSpeedCPUAdam when the optimizer states are offloaded to the CPU, ``torch.optim.AdamW`` otherwise.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from align.config.trainer import LoopConfig, OptimizerConfig

AUTO = "auto"
PRECISION_HINT = ("for bf16 set trainer.precision=bf16: autocast with fp32 adapter weights and optimizer states, "
                  "the same with or without DeepSpeed")
SHIPPED = "configs/deepspeed/{zero2,zero2_offload,zero3,zero3_offload}.json"


def read_ds_config(source: dict | str | Path) -> dict:
    """A DeepSpeed config from a dict (copied) or a JSON file."""
    if isinstance(source, dict):
        return copy.deepcopy(source)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"trainer.deepspeed={source}: no such file (shipped configs: {SHIPPED})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"trainer.deepspeed={source} is not valid JSON ({err})") from None


def offloads_optimizer(ds: dict) -> bool:
    device = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device not in (None, "none")


def resolve_ds_config(ds: dict, optim: OptimizerConfig, loop: LoopConfig, world_size: int,
                      hidden_size: int | None = None) -> dict:
    """``ds`` with every ``"auto"`` filled and checked against ``optim``/``loop``; raises ValueError otherwise."""
    ds = copy.deepcopy(ds)
    if "scheduler" in ds:
        raise ValueError("the DeepSpeed config has a 'scheduler' section: remove it; the learning-rate schedule comes "
                         "from trainer.optimizer (schedule, warmup_steps, min_lr_ratio)")
    if (ds.get("checkpoint") or {}).get("load_universal"):
        raise ValueError("the DeepSpeed config sets checkpoint.load_universal: remove it; DeepSpeed reads universal "
                         "checkpoints with an unrestricted pickle, and align resumes only from its own checkpoints, "
                         "read as data")
    if optim.name != "adamw":
        raise ValueError(f"trainer.optimizer.name={optim.name!r} is not available with trainer.deepspeed; use 'adamw' "
                         "(DeepSpeed shards or offloads the AdamW states instead)")
    opt_type = ds.setdefault("optimizer", {"type": "AdamW"}).setdefault("type", "AdamW")
    if opt_type.lower() not in ("adam", "adamw"):
        raise ValueError(f"DeepSpeed optimizer.type={opt_type!r}: align trains with AdamW; use 'AdamW'")
    ds["optimizer"]["type"] = "AdamW"
    ds["optimizer"].setdefault("params", {})
    ours: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": loop.micro_batch_size,
        "gradient_accumulation_steps": loop.grad_accum_steps,
        "train_batch_size": loop.micro_batch_size * loop.grad_accum_steps * world_size,
        "gradient_clipping": float(optim.max_grad_norm),
        "optimizer.params.lr": float(optim.lr),
        "optimizer.params.betas": [float(optim.beta1), float(optim.beta2)],
        "optimizer.params.eps": float(optim.eps),
        "optimizer.params.weight_decay": float(optim.weight_decay),
        "bf16.enabled": False,
        "fp16.enabled": False,
    }
    for key, value in ours.items():
        _fill(ds, key, value)
    # without offload, DeepSpeed's AdamW would be FusedAdam (a JIT-compiled op); torch's AdamW is the same update
    ds["optimizer"]["params"].setdefault("torch_adam", not offloads_optimizer(ds))
    _fill_zero_buckets(ds.get("zero_optimization", {}), hidden_size)
    left = _autos(ds)
    if left:
        raise ValueError(f"DeepSpeed config keys {left} are 'auto' but align has no value for them: set them")
    return ds


def _fill(ds: dict, dotted: str, value: Any) -> None:
    *parents, key = dotted.split(".")
    node = ds
    for part in parents:
        node = node.setdefault(part, {})
    current = node.get(key, AUTO)
    if current == AUTO:
        node[key] = value
    elif current != value:
        hint = PRECISION_HINT if key == "enabled" else "change the trainer config instead"
        raise ValueError(f"DeepSpeed config {dotted}={current!r} contradicts align's value {value!r}: set it to "
                         f"\"auto\" (filled from the trainer config); {hint}")


def _fill_zero_buckets(zero: dict, hidden_size: int | None) -> None:
    """The Hugging Face defaults for ZeRO's bucket sizes, from the model's hidden size (DeepSpeed's own if unknown)."""
    sizes = {"reduce_bucket_size": lambda h: h * h, "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
             "stage3_param_persistence_threshold": lambda h: 10 * h}
    for key, size in sizes.items():
        if zero.get(key) == AUTO:
            if hidden_size:
                zero[key] = size(hidden_size)
            else:
                del zero[key]


def _autos(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [k for key, value in node.items() for k in _autos(value, f"{prefix}{key}.")]
    return [prefix[:-1]] if node == AUTO else []
