"""The adapter engine: one frozen base, many named adapters of mixed methods (LoRA, rsLoRA, DoRA, QLoRA over
bitsandbytes layers, IA³, AdaLoRA, bottleneck adapters, prompt tuning, prefix tuning), one active per forward,
saved in PEFT's on-disk format (align's own for bottleneck adapters) with a fingerprint of their base.

Imports only torch and safetensors; bitsandbytes is touched only when a quantized layer is present, transformers
only when a prefix-tuning adapter runs on a transformers model.
"""

from .adalora import AdaLoraConfig, AdaLoraModule
from .adalora_allocator import AdaLoraAllocator
from .bottleneck import GPT2_HOULSBY, GPT2_PFEIFFER, HOULSBY, PFEIFFER, BottleneckConfig, BottleneckModule
from .config import AdapterConfig
from .errors import AdapterError, BaseMismatchError
from .fingerprint import base_fingerprint
from .ia3 import IA3Config, IA3Module
from .layer import AdaptedLayer
from .lora import DoraModule, LoraConfig, LoraModule
from .model import AdapterModel
from .module import AdapterModule, ModelAdapter
from .peft_format import load_adapter, read_adapter_config, save_adapter
from .prefix_tuning import PrefixTuningConfig, PrefixTuningModule
from .prepare import enable_gradient_checkpointing, prepare_for_kbit_training
from .prompt_tuning import PromptTuningConfig, PromptTuningModule
from .registry import METHODS, get_method, register_method
from .report import ParameterReport, parameter_report

__all__ = [
    "GPT2_HOULSBY", "GPT2_PFEIFFER", "HOULSBY", "METHODS", "PFEIFFER", "AdaLoraAllocator", "AdaLoraConfig",
    "AdaLoraModule", "AdaptedLayer", "AdapterConfig", "AdapterError", "AdapterModel", "AdapterModule",
    "BaseMismatchError", "BottleneckConfig", "BottleneckModule", "DoraModule", "IA3Config", "IA3Module",
    "LoraConfig", "LoraModule", "ModelAdapter", "ParameterReport", "PrefixTuningConfig", "PrefixTuningModule",
    "PromptTuningConfig", "PromptTuningModule", "base_fingerprint", "enable_gradient_checkpointing", "get_method",
    "load_adapter", "parameter_report", "prepare_for_kbit_training", "read_adapter_config", "register_method",
    "save_adapter",
]
