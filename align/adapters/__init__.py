"""The adapter engine: one frozen base, many named adapters (LoRA, rsLoRA, DoRA, QLoRA over bitsandbytes layers),
one active per forward, saved in PEFT's on-disk format with a fingerprint of their base.

Imports only torch and safetensors; bitsandbytes is touched only when a quantized layer is present.
"""

from .config import AdapterConfig
from .errors import AdapterError, BaseMismatchError
from .fingerprint import base_fingerprint
from .layer import AdaptedLayer
from .lora import DoraModule, LoraConfig, LoraModule
from .model import AdapterModel
from .module import AdapterModule
from .peft_format import load_adapter, read_adapter_config, save_adapter
from .prepare import enable_gradient_checkpointing, prepare_for_kbit_training
from .registry import METHODS, get_method, register_method
from .report import ParameterReport, parameter_report

__all__ = [
    "METHODS", "AdaptedLayer", "AdapterConfig", "AdapterError", "AdapterModel", "AdapterModule",
    "BaseMismatchError", "DoraModule", "LoraConfig", "LoraModule", "ParameterReport", "base_fingerprint",
    "enable_gradient_checkpointing", "get_method", "load_adapter", "parameter_report",
    "prepare_for_kbit_training", "read_adapter_config", "register_method", "save_adapter",
]
