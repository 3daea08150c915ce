"""The DeepSpeed back-end of the shared loop (ZeRO-2/3, CPU offload, several ranks) and a ZeRO-3-safe adapter save.

    backend = DeepSpeedBackend(trainer.modules, trainer.params, optim_cfg, loop_cfg, "configs/deepspeed/zero3.json")

The engine wraps the trainer's modules (the adapter model and any heads) and runs the trainer's loss function as its
forward, so every micro-batch goes through ``engine(...)``, where DeepSpeed counts micro-steps and ZeRO-3 fetches
parameters; only ``params`` (the trained adapter and head) are optimised.

**Every role adapter must exist before the engine is built**: ZeRO partitions the parameters it sees at
initialisation and its optimizer holds exactly the trainable ones, so an adapter added (or frozen, or unfrozen) later
would silently never train. The back-end refuses both: at construction when a parameter requires grad without being
trained, and at every step when the set of trainable parameters has changed.

How the loop's calls map onto the engine. The loop's exact normalisation is kept: it scales each micro-batch loss by
world size / units of the whole step, and DeepSpeed averages over ranks but must not divide by the accumulation steps.

    forward(loss_fn, batch)  engine(loss_fn, batch), which calls loss_fn(batch)
    backward(loss)           engine.backward(loss, scale_wrt_gas=False), then engine.step() on non-boundary
                             micro-batches (DeepSpeed counts micro-batches in step(); it updates nothing there)
    clip_and_norm()          engine.step() at the accumulation boundary: DeepSpeed computes the global gradient norm,
                             clips and updates (skipping the update when the norm is not finite); returns the norm
                             before clipping
    lr                       the learning rate of that update (align's own schedule, stepped by DeepSpeed)
    step()                   nothing left to do

Checkpoints are DeepSpeed's own shards (``save_checkpoint``), but they are read back without pickle: the engine's
checkpoint loader is replaced by ``load_without_pickle`` (``torch.load(weights_only=True)``, DeepSpeed's three plain
state classes allowed), so resuming from a run directory on shared storage never runs code from it.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import socket
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from torch import nn

from align.adapters import AdaptedLayer, AdapterModel
from align.adapters import base_layers as bl
from align.config.trainer import LoopConfig, OptimizerConfig
from align.models.forward import causal_lm
from align.trainers.optim import build_scheduler

from .ds_config import read_ds_config, resolve_ds_config

CHECKPOINT_SUBDIR = "deepspeed"
CHECKPOINT_TAG = "engine"


def init_distributed() -> None:
    """Join the process group (gloo on CPU). A process started without a launcher (no ``WORLD_SIZE`` in the
    environment) forms a group of one on a free local port."""
    if dist.is_initialized():  # joined already (Ray Train, an earlier engine in this process): DeepSpeed still
        # reads the rank variables from the environment, which whoever made the group may not have set or kept
        os.environ.setdefault("RANK", str(dist.get_rank()))
        os.environ.setdefault("WORLD_SIZE", str(dist.get_world_size()))
        os.environ.setdefault("LOCAL_RANK", os.environ["RANK"] if dist.get_world_size() == 1 else
                              str(dist.get_rank() % max(torch.cuda.device_count(), 1)))
        return
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE is set but {missing} are not: start the ranks with torchrun or the "
                           "deepspeed launcher, which set them all")
    deepspeed.init_distributed(auto_mpi_discovery=False)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LossModule(nn.Module):
    """What the engine wraps: the trainer's modules, and the trainer's loss function as forward."""

    def __init__(self, modules: list[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(modules)

    def forward(self, loss_fn, batch):
        return loss_fn(batch)


def _to_device(batch, device: torch.device):
    """The batch's tensors on the engine's device (DeepSpeed moves the model to its accelerator, not the data)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {key: _to_device(value, device) for key, value in batch.items()}
    return batch


def _trainable(modules: nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in modules.named_parameters() if p.requires_grad}


def _hidden_size(modules: list[nn.Module]) -> int | None:
    return next((m.config.hidden_size for m in modules if hasattr(getattr(m, "config", None), "hidden_size")), None)


QUANTIZED_ZERO3 = ("ZeRO-3 partitions every parameter of the module, the frozen 4-bit/8-bit base's packed storage "
                   "included, and the weights it gathers back no longer match bitsandbytes' quantization state "
                   "(measured: LoRA weights drift by 4e-4 from the plain back-end after 3 steps on an NF4 base); "
                   "use ZeRO-2 (zero2 or zero2_offload): the quantized base is replicated on every rank, the "
                   "adapters' gradients and optimizer state are partitioned")


def _check_quantized_base(module: nn.Module, config: dict) -> None:
    if config.get("zero_optimization", {}).get("stage", 0) == 3 and any(bl.is_quantized(m) for m in module.modules()):
        raise ValueError(f"a quantized base with DeepSpeed ZeRO-3: {QUANTIZED_ZERO3}")


def _param_groups(params: list[nn.Parameter], cfg: OptimizerConfig) -> list[dict]:
    """As ``align.trainers.optim.build_optimizer``: no weight decay on 1-D tensors."""
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class DeepSpeedBackend:
    """The loop's optimisation back-end on a DeepSpeed engine. Build it after every adapter exists."""

    def __init__(self, modules: list[nn.Module], params: dict[str, nn.Parameter], optim: OptimizerConfig,
                 loop: LoopConfig, ds_config: dict | str | Path) -> None:
        init_distributed()
        self.params = params
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.module = LossModule(modules)
        self._check_trainable_set()
        self.config = resolve_ds_config(read_ds_config(ds_config), optim, loop, self.world_size,
                                        _hidden_size(modules))
        _check_quantized_base(self.module, self.config)
        self.engine, *_ = deepspeed.initialize(
            model=self.module, model_parameters=_param_groups(list(params.values()), optim), config=self.config,
            lr_scheduler=lambda optimizer: build_scheduler(optimizer, optim, loop.max_steps))
        self.engine.checkpoint_engine.load = load_without_pickle  # every file DeepSpeed reads back goes through it
        self.zero_stage = self.engine.zero_optimization_stage()
        self._trainable_at_init = _trainable(self.module)
        self._lr = self._scheduled_lr()
        if self.zero_stage == 3:
            self._keep_output_heads_whole(modules)

    def _keep_output_heads_whole(self, modules: list[nn.Module]) -> None:
        """align computes log-probs from the output head's weight in vocabulary chunks, outside the head's forward,
        where ZeRO-3 cannot gather it. Keep the (frozen) head whole on every rank, as ZeRO-3 keeps its small
        "persistent" parameters: it costs vocab x hidden per rank and never materialises (tokens, vocab) logits."""
        lms = [causal_lm(m) for m in modules if hasattr(causal_lm(m), "get_output_embeddings")]
        heads = [head for lm in lms if (head := lm.get_output_embeddings()) is not None]
        params = [p for head in heads for p in head.parameters() if hasattr(p, "ds_id") and not p.requires_grad]
        persistent = self.engine.optimizer.persistent_parameters  # re-gathered after each step and checkpoint
        for param in params:
            param.ds_persist = True
            # a forward whose module trace is not complete (the first evaluation after training, say) releases
            # every parameter of each submodule it leaves, persistent or not; with tied embeddings that would
            # release the head's weight after the embedding layer. External parameters are never released there.
            param.is_external_param = True
            if all(param is not p for p in persistent):
                persistent.append(param)
        if params:
            params[0].all_gather(params)

    def before_eval(self) -> None:
        """ZeRO-3 releases every parameter around optimizer steps and checkpoints and gathers the persistent ones
        again afterwards; evaluation reads the output head's weight outside any hooked forward, so make sure it is
        whole (gathering whatever is missing)."""
        if self.zero_stage != 3:
            return
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        persistent = self.engine.optimizer.persistent_parameters
        missing = [p for p in persistent if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
        if missing:
            missing[0].all_gather(missing)

    def _check_trainable_set(self) -> None:
        trained = {id(p) for p in self.params.values()}
        stray = [name for i, name in _trainable(self.module).items() if i not in trained]
        if stray:
            raise ValueError(f"parameters {stray[:3]} require grad but are not trained by this trainer: freeze their "
                             "adapter (model.freeze(name)) before the DeepSpeed engine is built")

    def _check_unchanged(self) -> None:
        now = _trainable(self.module)
        if now.keys() != self._trainable_at_init.keys():
            added = [now[i] for i in now.keys() - self._trainable_at_init.keys()]
            removed = [self._trainable_at_init[i] for i in self._trainable_at_init.keys() - now.keys()]
            raise RuntimeError(
                f"the trainable parameters changed after the DeepSpeed engine was built (new: {added[:3]}, no "
                f"longer trainable: {removed[:3]}); DeepSpeed only trains the set it saw at initialisation. Create "
                "every role adapter (and set what is frozen) before building the trainer")

    # ------------------------------------------------------------------------------------- optimisation
    def forward(self, loss_fn, batch):
        return self.engine(loss_fn, _to_device(batch, self.engine.device))

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()

    def clip_and_norm(self) -> float:
        """DeepSpeed's boundary step: global gradient norm (before clipping), clipping and the update."""
        self._check_unchanged()
        self._lr = self._scheduled_lr()  # before DeepSpeed's step advances the schedule
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    def step(self, zero_grad: bool = True) -> None:
        """Nothing: DeepSpeed clips inside its step, so the update already ran in ``clip_and_norm`` (and cleared the
        gradients: AdaLoRA, which needs them after the update, is refused with DeepSpeed)."""

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    @property
    def lr(self) -> float:
        """The learning rate of the latest update (before the first: of the first)."""
        return self._lr

    def _scheduled_lr(self) -> float:
        return self.engine.lr_scheduler.get_last_lr()[0]

    @property
    def synced_forwards(self) -> bool:
        """ZeRO-3 on several ranks gathers each layer's parameters in every forward, a collective: the ranks must run
        the same number of forwards (generation continues until every rank has finished)."""
        return self.zero_stage == 3 and self.world_size > 1

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over every rank (moved to the engine's device for the collective and back)."""
        out = tensor.detach().to(self.engine.device).clone()
        dist.all_reduce(out)
        return out.to(tensor.device)

    def all_reduce_sum(self, value: int) -> int:
        total = torch.tensor([value], dtype=torch.long, device=self.engine.device)  # NCCL reduces GPU tensors
        dist.all_reduce(total)
        return int(total.item())

    def barrier(self) -> None:
        dist.barrier()

    def gathered(self) -> contextlib.AbstractContextManager:
        """Full trainable tensors on every rank inside the block (ZeRO-3 partitions them); rank 0's changes are
        kept, in the parameters only: ZeRO's fp32 master copy is restored by ``load_state``, which the loop's resume
        calls next. A no-op under ZeRO-2, where every rank holds whole parameters."""
        return deepspeed.zero.GatheredParameters(list(self.params.values()), modifier_rank=0)

    # ------------------------------------------------------------------- checkpoint hooks (every rank)
    def save_state(self, directory: Path) -> dict:
        """DeepSpeed's optimizer/scheduler shards under ``directory/deepspeed`` (each rank writes its own); the frozen
        base is not written."""
        self.engine.save_checkpoint(str(directory / CHECKPOINT_SUBDIR), tag=CHECKPOINT_TAG, save_latest=False,
                                    exclude_frozen_parameters=True)
        return {"deepspeed": {"world_size": self.world_size, "zero_stage": self.zero_stage}}

    def load_state(self, directory: Path, state: dict) -> None:
        """DeepSpeed's shards back into the engine, read with ``load_without_pickle``: a checkpoint directory is
        data, never code."""
        saved = state.get("deepspeed")
        if saved is None:
            raise RuntimeError(f"checkpoint {directory} was written without DeepSpeed; resume it without "
                               "trainer.deepspeed or start a fresh output directory")
        if saved != {"world_size": self.world_size, "zero_stage": self.zero_stage}:
            raise RuntimeError(f"checkpoint {directory} was written with {saved}, this run has world_size="
                               f"{self.world_size}, zero_stage={self.zero_stage}: resume with the same setup")
        path, _ = self.engine.load_checkpoint(str(directory / CHECKPOINT_SUBDIR), tag=CHECKPOINT_TAG,
                                              load_module_strict=False, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load its state from {directory / CHECKPOINT_SUBDIR}")


def _plain_state_classes() -> list[type]:
    """The only non-tensor objects DeepSpeed 0.19 pickles into its checkpoints with bf16/fp16 off (checked on ZeRO-2
    and ZeRO-3, with and without offload): plain data, whose unpickling sets attributes and runs no code of the
    file's choosing."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def load_without_pickle(path, map_location=None):
    """What DeepSpeed's checkpoint engine loads with ``torch.load(weights_only=False)``, i.e. any pickle, read with
    ``weights_only=True`` instead: tensors, containers, numbers and strings, plus DeepSpeed's plain state classes.
    Anything else (a pickle that would call a function or build another object: a run directory on shared storage
    must never become code execution) raises a RuntimeError naming the file and what it holds."""
    try:
        with torch.serialization.safe_globals(_plain_state_classes()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        what = f"a reference to {found.group(1)}" if found else str(err).split("WeightsUnpickler error: ")[-1][:200]
        raise RuntimeError(
            f"{path}: refusing to unpickle it: it holds more than tensors and DeepSpeed's plain state ({what}). A "
            "checkpoint is only ever read as data; this file was not written by align's DeepSpeed back-end or was "
            "changed since. Delete this checkpoint (or move the output directory away) to restart the stage") from None


def save_adapter_gathered(model: AdapterModel, name: str, directory: str | Path) -> Path:
    """Save adapter ``name`` in PEFT format from a (possibly ZeRO-3) engine; every rank must call it.

    ZeRO-3 leaves each rank a shard of every parameter, and saving that writes empty tensors (trl#4416,
    peft#2892): the adapter's weights are gathered first, with the base parameters its fingerprint reads whole
    (embeddings and norms: not the large linear layers), and rank 0 writes them with ``AdapterModel.save_adapter``.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    with deepspeed.zero.GatheredParameters(model.adapter_parameters(name) + _fingerprinted(model), modifier_rank=None):
        if rank == 0:
            model.save_adapter(name, directory)
    if dist.is_initialized():
        dist.barrier()
    return Path(directory)


def _fingerprinted(model: AdapterModel) -> list[nn.Parameter]:
    """The base parameters ``base_fingerprint`` reads whole: all but those of linear (and quantized) layers, whose
    shapes it takes from the layer's attributes."""
    return [p for m in model.model.modules()
            if not isinstance(m, (AdaptedLayer, nn.Linear)) and not bl.is_quantized(m)
            for p in m.parameters(recurse=False)]
