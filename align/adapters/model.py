"""``AdapterModel``: one frozen base and any number of named adapters, one active per forward.

    model = AdapterModel(base)                         # base frozen; nothing wrapped yet
    model.add_adapter("sft", LoraConfig(r=16))
    model.add_adapter("policy", LoraConfig(r=16))
    with model.use("policy"):   logits = model(input_ids).logits
    with model.disabled():      base_logits = model(input_ids).logits

Layer methods (LoRA, IA³, AdaLoRA, bottleneck adapters) live in ``AdaptedLayer`` wrappers; model-level methods
(prompt and prefix tuning) live in ``model_adapters`` and act through one pre-hook and one post-hook on the
backbone (the transformers ``base_model``), installed with the first such adapter: while one of them is active it
rewrites the backbone's inputs (``inputs_embeds``, ``past_key_values``, the attention mask) and output. Both kinds
mix freely under one base and switch the same way.

Rules the engine keeps: the base never trains (its parameters stay ``requires_grad=False``); switching the active
adapter changes neither ``requires_grad`` nor any weight; only the active adapter's output is added, so only its
parameters receive gradients; every adapter lives in one dtype (``adapter_dtype``, fp32 by default) whatever the
base's dtype or quantization, and inputs are cast to it inside the adapter.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from . import base_layers as bl
from .config import AdapterConfig
from .errors import AdapterError
from .layer import AdaptedLayer, AdapterState
from .module import AdapterModule, ModelAdapter
from .registry import method_of
from .targeting import find_targets


class AdapterModel(nn.Module):
    """A transformers-style causal LM (or any nn.Module) with named adapters. ``self.model`` is the base."""

    def __init__(self, model: nn.Module, adapter_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if isinstance(model, AdapterModel):
            raise AdapterError("model is already an AdapterModel; add adapters to it directly")
        if not adapter_dtype.is_floating_point or adapter_dtype == torch.float16 and _is_cpu(model):
            raise AdapterError(f"adapter_dtype {adapter_dtype} is not usable here; use torch.float32 or bfloat16")
        self.model = model
        self.adapter_dtype = adapter_dtype
        self.configs: dict[str, AdapterConfig] = {}
        self._state = AdapterState()
        self._layers: dict[str, AdaptedLayer] = {}
        self.model_adapters = nn.ModuleDict()  # name -> ModelAdapter (prompt / prefix tuning)
        self._hooks: list = []  # the backbone hooks through which model adapters act, while any exists
        model.requires_grad_(False)
        for module in model.modules():  # every 4-bit layer, adapted or not: gradients flow through all of them
            bl.unpack_4bit(module)

    # ----------------------------------------------------------------------------------------- adapters
    @property
    def adapter_names(self) -> list[str]:
        return list(self.configs)

    def add_adapter(self, name: str, config: AdapterConfig, trainable: bool = True) -> None:
        """Wrap the layers ``config`` targets (once) and give each a fresh ``name`` adapter; a model-level method
        (prompt / prefix tuning) gets one module for the whole model instead."""
        self._check_new_name(name, "add an adapter")
        method = method_of(config)
        if issubclass(method.module_cls, ModelAdapter):
            self._install_hooks()  # first: it refuses a model that is not a transformers LM
            try:
                module = method.module_cls.build(config, self.model, self.adapter_dtype)
            except Exception:
                if not len(self.model_adapters):
                    self._remove_hooks()
                raise
            self.model_adapters[name] = module.train(self.model.training)
            config = module.config  # with the model-derived fields (hidden size, layers...) filled in
        else:
            paths = find_targets(self.model, config.target_modules, config.exclude_modules)
            for path in paths:
                layer = self._wrap(path)
                layer.add(name, method.module_cls.build(config, layer.base_layer, self.adapter_dtype, path=path))
        self.configs[name] = config
        self.set_trainable(name, trainable)

    def delete_adapter(self, name: str) -> None:
        self._check(name)
        if any(layer.merged == name for layer in self._layers.values()):
            raise AdapterError(f"adapter {name!r} is merged into the base; unmerge() it before deleting")
        for layer in self._layers.values():
            if name in layer.adapters:
                del layer.adapters[name]
        if name in self.model_adapters:
            del self.model_adapters[name]
            if not len(self.model_adapters):
                self._remove_hooks()
        del self.configs[name]
        if self._state.active == name:
            self._state.active = None

    def copy_adapter(self, source: str, name: str, trainable: bool = True) -> None:
        """A new adapter ``name`` with the same config and a copy of ``source``'s current state (every method's
        modules are copied whole, so state a fresh build would not reproduce, such as AdaLoRA's pruned ranks,
        comes along)."""
        self._check(source)
        self._check_new_name(name, "copy an adapter")
        for layer in self.layers_of(source).values():
            layer.add(name, copy.deepcopy(layer.adapters[source]))
        if source in self.model_adapters:
            self.model_adapters[name] = copy.deepcopy(self.model_adapters[source])
        self.configs[name] = self.configs[source]
        for param in self.adapter_parameters(name):
            param.grad = None  # deepcopy copies gradients too; a new adapter has none
        self.set_trainable(name, trainable)

    def layers_of(self, name: str) -> dict[str, AdaptedLayer]:
        """path -> wrapper, for the layers that carry adapter ``name``."""
        self._check(name)
        return {p: layer for p, layer in self._layers.items() if name in layer.adapters}

    def model_adapter(self, name: str) -> ModelAdapter | None:
        """The module of model-level adapter ``name`` (prompt / prefix tuning); None for a layer method."""
        self._check(name)
        return self.model_adapters[name] if name in self.model_adapters else None

    def adapter_modules(self, name: str) -> list[AdapterModule]:
        """Every module of adapter ``name``: one per adapted layer, or its one model-level module."""
        model_adapter = self.model_adapter(name)
        if model_adapter is not None:
            return [model_adapter]
        return [layer.adapters[name] for layer in self.layers_of(name).values()]

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """PEFT-style keys relative to the base model (``model.layers.0.self_attn.q_proj.lora_A.weight``); a
        model-level adapter's keys as PEFT writes them (``prompt_embeddings``)."""
        model_adapter = self.model_adapter(name)
        if model_adapter is not None:
            return model_adapter.peft_state_dict()
        return {
            f"{path}.{key}": tensor
            for path, layer in self.layers_of(name).items()
            for key, tensor in layer.adapters[name].peft_state_dict().items()
        }

    # ------------------------------------------------------------------------------------- switching
    @property
    def active_adapter(self) -> str | None:
        return self._state.active

    def set_active(self, name: str | None) -> None:
        """Make ``name`` the adapter used by every later forward (None: the bare base)."""
        if name is not None:
            self._check(name)
        merged = self.merged_adapter
        if merged is not None and name != merged:
            raise AdapterError(
                f"adapter {merged!r} is merged into the base weights, so {name!r} cannot run on a clean base; "
                "call unmerge() first"
            )
        self._state.active = name

    @contextmanager
    def use(self, name: str | None) -> Iterator[AdapterModel]:
        """Run the block with adapter ``name`` active (None: the bare base); the previous choice is restored."""
        previous = self._state.active
        self.set_active(name)
        try:
            yield self
        finally:
            self._state.active = previous

    def disabled(self):
        """Run the block on the bare base, all adapters off."""
        return self.use(None)

    # ---------------------------------------------------------------------------------- trainability
    def set_trainable(self, name: str, trainable: bool) -> None:
        """Freeze or unfreeze every parameter of adapter ``name``; nothing else changes."""
        for param in self.adapter_parameters(name):
            param.requires_grad_(trainable)

    def freeze(self, name: str) -> None:
        self.set_trainable(name, False)

    def unfreeze(self, name: str) -> None:
        self.set_trainable(name, True)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return [p for module in self.adapter_modules(name) for p in module.parameters()]

    def named_adapter_parameters(self, name: str) -> Iterator[tuple[str, nn.Parameter]]:
        model_adapter = self.model_adapter(name)
        if model_adapter is not None:
            yield from model_adapter.named_parameters()
        for path, layer in self.layers_of(name).items():
            for key, param in layer.adapters[name].named_parameters():
                yield f"{path}.{key}", param

    # ---------------------------------------------------------------------------------------- merging
    @property
    def merged_adapter(self) -> str | None:
        names = {layer.merged for layer in self._layers.values()} - {None}
        return names.pop() if names else None

    def merge(self, name: str, dequantize: bool = False) -> None:
        """Fold adapter ``name`` into the base weights (forward of ``name`` then costs nothing extra).

        A quantized base layer cannot hold the update without rounding it away: the call is refused unless
        ``dequantize=True``, which first replaces those layers by full-precision copies (``adapter_dtype``) and keeps
        them so. While merged, only ``name`` can be active; ``unmerge()`` restores the base.
        """
        self._check(name)
        self._refuse_while_merged(f"merge {name!r}")
        refusal = next((m.merge_refusal for m in self.adapter_modules(name) if m.merge_refusal), None)
        if refusal:
            raise AdapterError(f"adapter {name!r} ({self.configs[name].peft_type}) cannot be merged into the base "
                               f"weights: {refusal}")
        layers = self.layers_of(name)
        quantized = [p for p, layer in layers.items() if bl.is_quantized(layer.base_layer)]
        if quantized and not dequantize:
            raise AdapterError(
                f"adapter {name!r} sits on {len(quantized)} quantized layers (e.g. {quantized[0]}); merging into "
                "4/8-bit weights would round the update away. Pass dequantize=True to replace them by full-precision "
                "layers first, or load the base in full precision and merge there"
            )
        for layer in layers.values():
            if bl.is_quantized(layer.base_layer):
                layer.base_layer = bl.dequantized_linear(layer.base_layer, self.adapter_dtype)
            layer.adapters[name].merge_into(layer.base_layer)
            layer.merged = name
        self._state.active = name

    def unmerge(self) -> None:
        """Undo ``merge``: subtract the update again (exact up to floating-point rounding)."""
        name = self.merged_adapter
        if name is None:
            return
        for layer in self._layers.values():
            if layer.merged == name:
                layer.adapters[name].unmerge_from(layer.base_layer)
                layer.merged = None

    def merge_and_unload(self, name: str, dequantize: bool = False) -> nn.Module:
        """Merge ``name`` and return the plain base model with every wrapper removed (other adapters are dropped).
        The result is an ordinary transformers model: ``save_pretrained`` it to export."""
        self.merge(name, dequantize=dequantize)
        for path, layer in list(self._layers.items()):
            _set_submodule(self.model, path, layer.base_layer)
        self._layers.clear()
        self.model_adapters = nn.ModuleDict()
        self._remove_hooks()
        self.configs.clear()
        self._state.active = None
        return self.model

    # ------------------------------------------------------------------------------ saving, reporting
    def save_adapter(self, name: str, directory):
        """Write adapter ``name`` in PEFT's format (see ``peft_format.save_adapter``)."""
        from .peft_format import save_adapter

        return save_adapter(self, name, directory)

    def load_adapter(self, directory, name: str, trainable: bool = False, check_base: bool = True):
        """Add adapter ``name`` from a PEFT-format directory (see ``peft_format.load_adapter``)."""
        from .peft_format import load_adapter

        return load_adapter(self, directory, name, trainable=trainable, check_base=check_base)

    def parameter_report(self):
        """Trainable vs all parameters, like PEFT's ``print_trainable_parameters``."""
        from .report import parameter_report

        return parameter_report(self)

    # ----------------------------------------------------------------------------------- forwarding
    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.model.generate(*args, **kwargs)

    @property
    def config(self):
        return getattr(self.model, "config", None)

    # --------------------------------------------------------------------------------------- helpers
    def _wrap(self, path: str) -> AdaptedLayer:
        if path in self._layers:
            return self._layers[path]
        base = self.model.get_submodule(path)
        bl.unpack_4bit(base)
        layer = AdaptedLayer(base, self._state)
        _set_submodule(self.model, path, layer)
        self._layers[path] = layer
        return layer

    def _install_hooks(self) -> None:
        if self._hooks:
            return
        backbone = getattr(self.model, "base_model", None)
        if not isinstance(backbone, nn.Module) or not hasattr(self.model, "get_input_embeddings"):
            raise AdapterError(
                f"{type(self.model).__name__} is not a transformers model with a backbone (base_model) and input "
                "embeddings, which prompt and prefix tuning act on; use a layer method (LoRA, IA3, ...)"
            )
        self._hooks = [backbone.register_forward_pre_hook(self._before_backbone, with_kwargs=True),
                       backbone.register_forward_hook(self._after_backbone)]

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def _active_model_adapter(self) -> ModelAdapter | None:
        name = self._state.active
        return self.model_adapters[name] if name is not None and name in self.model_adapters else None

    def _before_backbone(self, backbone: nn.Module, args: tuple, kwargs: dict):
        adapter = self._active_model_adapter()
        if adapter is None:
            return None
        if len(args) > 1:
            raise AdapterError(f"{type(backbone).__name__} was called with {len(args)} positional arguments; "
                               "prompt and prefix tuning need keyword arguments after input_ids")
        if args:  # GPT-2 passes input_ids positionally
            kwargs = {**kwargs, "input_ids": args[0]}
        return (), adapter.prepare(backbone, dict(kwargs))

    def _after_backbone(self, backbone: nn.Module, args: tuple, output):
        adapter = self._active_model_adapter()
        return None if adapter is None else adapter.finish(output)

    def _check_new_name(self, name: str, what: str) -> None:
        if not name or not isinstance(name, str) or "." in name:
            raise AdapterError(f"adapter name must be a non-empty string without dots, got {name!r}")
        if name in self.configs:
            raise AdapterError(f"adapter {name!r} already exists; delete_adapter({name!r}) first or pick another "
                               "name")
        self._refuse_while_merged(what)

    def _check(self, name: str) -> None:
        if name not in self.configs:
            raise AdapterError(f"no adapter named {name!r}; adapters: {self.adapter_names or 'none'}")

    def _refuse_while_merged(self, what: str) -> None:
        merged = self.merged_adapter
        if merged is not None:
            raise AdapterError(f"cannot {what} while adapter {merged!r} is merged into the base; unmerge() first")


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, child, module)


def _is_cpu(model: nn.Module) -> bool:
    return all(p.device.type in ("cpu", "meta") for p in model.parameters())
