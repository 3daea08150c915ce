"""Memory per rank, predicted from the config: what each part of one training stage costs on one rank, in bytes.

Pure arithmetic (stdlib only at import): the model's shape comes from its ``config.json`` (or the embedded base's
config), never from loading weights. ``python -m align.run --cfg job`` prints ``memory_plan.describe_memory(cfg)``;
``scripts/memory_table.py`` makes the tables of docs/pipelines.md ("Memory per rank"). n = parameter count.

    base         the frozen base. fp32 4 B/param, bf16 2 B/param. NF4 (transformers' ``BitsAndBytesConfig`` as
                 ``align.models.loading`` builds it: blocksize 64, no double quantization): each quantized Linear
                 weight takes ceil(n/2) B packed + 4 B fp32 absmax per 64 values + a 16-entry fp32 code (64 B);
                 with double quantization (``double_quant=True``, bitsandbytes' own default) the absmax is 1 B per
                 block plus a 256-value fp32 code, one fp32 absmax per 256 blocks and an fp32 offset. int8: n B + a
                 4 B fp32 scale per output row. Embeddings, norms, biases and lm_head stay in ``model.dtype``.
    adapters     every adapter the stage holds, trainable or frozen, in fp32 (``AdapterModel``'s adapter dtype).
                 LoRA per target layer: A is r x in, B is out x r (q/k/v/o with GQA: k/v out = kv_heads x
                 head_dim); + out for DoRA's magnitude; + out for ``bias=lora_only`` where the layer has a bias
    heads        a score or value head: hidden + 1 fp32 values
    grads        fp32 gradients of the trained adapters and heads (4 B/param)
    optimizer    AdamW: two fp32 moments (8 B/param, + a 4 B step per tensor); bitsandbytes AdamW8bit: 2 x 1 B + an
                 fp32 absmax per 256 values for tensors of >= 4096 values (+ two shared 1 KiB maps), 8 B/param below
                 that. The adapters are fp32 already, so plain PyTorch keeps no master copy
    activations  ~ one micro-batch with gradients: what autograd keeps, plus the log-prob path's logits slices
                 (see ``activation_parts``); not the allocator's slack nor one layer's backward temporaries
    KV cache     RL stages: 2 x layers x kv_heads x head_dim x (prompt + new tokens) x generation rows x dtype B,
                 the rows min(rollout.generation_batch_size, prompts_per_step x group_size)

The device total is base + adapters + heads + grads + optimizer + max(activations, KV cache): generation and the
update never run at once. DeepSpeed (sft/rm/dpo only; P = trained params, N = ranks; align keeps DeepSpeed's
bf16 off, so params, master and states are fp32):

    ZeRO-2          grads 4P/N + the reduce bucket(s) (reduce_bucket_size x 4 B, two with overlap_comm);
                    optimizer = fp32 master partition 4P/N (DeepSpeed clones it even from fp32) + moments 8P/N
    ZeRO-2 offload  master, moments, grad partition and a staging copy (4 + 8 + 4 + 4 B)P/N on the host;
                    the device keeps the params and the bucket(s)
    ZeRO-3          every parameter, the frozen base included, is split over the ranks, except tensors under
                    stage3_param_persistence_threshold values and the output head (align keeps it whole); with
                    N > 1 the layer being computed is gathered (one decoder layer + the prefetch bucket). The
                    fp32 partition is the master; moments 8P/N, grads 4P/N + one bucket
    ZeRO-3 offload  params partitions and the optimizer's master, moments and grads on the host
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, field

KiB, MiB, GiB = 2**10, 2**20, 2**30
KEEP_LOGITS_BYTES = 256 * MiB  # = align.algos.logprobs.KEEP_LOGITS_BYTES (a test keeps them equal)
DTYPE_BYTES = {"fp32": 4, "bf16": 2}
NF4_BLOCK, NF4_CODE, NESTED_BLOCK, NESTED_CODE = 64, 16, 256, 256
ADAM8_BLOCK, ADAM8_MIN = 256, 4096
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")
RL_STAGES = ("ppo", "grpo", "rloo")
TRAINING_STAGES = ("sft", "rm", "dpo", *RL_STAGES)
LORA_METHODS = ("lora", "dora", "rslora")
# DeepSpeed's defaults when a key is absent ("auto" is filled by align from the hidden size)
DS_DEFAULTS = {"reduce_bucket_size": 500_000_000, "stage3_prefetch_bucket_size": 50_000_000,
               "stage3_param_persistence_threshold": 100_000}
DS_AUTO = {"reduce_bucket_size": lambda h: h * h, "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
           "stage3_param_persistence_threshold": lambda h: 10 * h}


class Unpredictable(ValueError):
    """The memory cannot be predicted without loading something (the reason is the message)."""


# ------------------------------------------------------------------------------------------------ shapes
@dataclass(frozen=True)
class Param:
    """One parameter tensor: ``path`` its module, ``numel`` its size; ``features`` (in, out) for the weight of a
    Linear / Conv1D layer (an adapter target); ``quantized``: bitsandbytes replaces that layer."""

    path: str
    name: str
    numel: int
    features: tuple[int, int] | None = None
    quantized: bool = False


@dataclass(frozen=True)
class ModelShape:
    """What the memory depends on, read from a transformers config (Llama, Mistral, Qwen2/3 or GPT-2)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool
    family: str = "llama"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    max_positions: int = 0

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_config(cls, config: dict, source: str = "config.json") -> ModelShape:
        kind = config.get("model_type")
        if kind == "gpt2":
            h = config["n_embd"]
            return cls(config["vocab_size"], h, config["n_layer"], config.get("n_inner") or 4 * h, config["n_head"],
                       config["n_head"], h // config["n_head"], config.get("tie_word_embeddings", True), "gpt2",
                       qkv_bias=True, o_bias=True, mlp_bias=True, max_positions=config["n_positions"])
        if kind not in LLAMA_LIKE:
            raise Unpredictable(f"{source}: model_type {kind!r} has no shape rule here ({', '.join(LLAMA_LIKE)}, "
                                "gpt2 have)")
        h, heads = config["hidden_size"], config["num_attention_heads"]
        bias = bool(config.get("attention_bias", False))
        return cls(config["vocab_size"], h, config["num_hidden_layers"], config["intermediate_size"], heads,
                   config.get("num_key_value_heads") or heads, config.get("head_dim") or h // heads,
                   bool(config.get("tie_word_embeddings", False)), kind,
                   qkv_bias=bias or kind == "qwen2", o_bias=bias, mlp_bias=bool(config.get("mlp_bias", False)),
                   qk_norm=kind == "qwen3")

    def params(self) -> list[Param]:
        """Every parameter tensor, named as transformers names the modules (tied weights once)."""
        return self._gpt2_params() if self.family == "gpt2" else self._llama_params()

    def _llama_params(self) -> list[Param]:
        h, i, q, kv, d = self.hidden_size, self.intermediate_size, self.q_dim, self.kv_dim, self.head_dim
        out = [Param("model.embed_tokens", "weight", self.vocab_size * h)]
        linears = [("self_attn.q_proj", h, q, self.qkv_bias), ("self_attn.k_proj", h, kv, self.qkv_bias),
                   ("self_attn.v_proj", h, kv, self.qkv_bias), ("self_attn.o_proj", q, h, self.o_bias),
                   ("mlp.gate_proj", h, i, self.mlp_bias), ("mlp.up_proj", h, i, self.mlp_bias),
                   ("mlp.down_proj", i, h, self.mlp_bias)]
        for layer in range(self.num_layers):
            prefix = f"model.layers.{layer}"
            out.append(Param(f"{prefix}.input_layernorm", "weight", h))
            for name, d_in, d_out, bias in linears:
                out.append(Param(f"{prefix}.{name}", "weight", d_in * d_out, (d_in, d_out), quantized=True))
                if bias:
                    out.append(Param(f"{prefix}.{name}", "bias", d_out))
            if self.qk_norm:
                out += [Param(f"{prefix}.self_attn.q_norm", "weight", d), Param(f"{prefix}.self_attn.k_norm", "weight", d)]
            out.append(Param(f"{prefix}.post_attention_layernorm", "weight", h))
        out.append(Param("model.norm", "weight", h))
        if not self.tie_word_embeddings:  # transformers keeps the output head out of bitsandbytes
            out.append(Param("lm_head", "weight", self.vocab_size * h, (h, self.vocab_size)))
        return out

    def _gpt2_params(self) -> list[Param]:
        h, i = self.hidden_size, self.intermediate_size
        out = [Param("transformer.wte", "weight", self.vocab_size * h),
               Param("transformer.wpe", "weight", self.max_positions * h)]
        for layer in range(self.num_layers):
            prefix = f"transformer.h.{layer}"
            for norm in ("ln_1", "ln_2"):
                out += [Param(f"{prefix}.{norm}", "weight", h), Param(f"{prefix}.{norm}", "bias", h)]
            for name, d_in, d_out in (("attn.c_attn", h, 3 * h), ("attn.c_proj", h, h), ("mlp.c_fc", h, i),
                                      ("mlp.c_proj", i, h)):
                out += [Param(f"{prefix}.{name}", "weight", d_in * d_out, (d_in, d_out), quantized=True),
                        Param(f"{prefix}.{name}", "bias", d_out)]
        out += [Param("transformer.ln_f", "weight", h), Param("transformer.ln_f", "bias", h)]
        if not self.tie_word_embeddings:
            out.append(Param("lm_head", "weight", self.vocab_size * h, (h, self.vocab_size)))
        return out


def param_bytes(param: Param, quantization: str, dtype: str, double_quant: bool = False) -> int:
    """Bytes of one base tensor (see the module docstring for the NF4 / int8 layouts)."""
    if not param.quantized or param.name != "weight" or quantization == "none":
        return param.numel * DTYPE_BYTES[dtype]
    n = param.numel
    if quantization == "int8":
        return n + 4 * param.features[1]
    blocks = math.ceil(n / NF4_BLOCK)
    packed = math.ceil(n / 2) + 4 * NF4_CODE
    if not double_quant:
        return packed + 4 * blocks
    return packed + blocks + 4 * math.ceil(blocks / NESTED_BLOCK) + 4 * NESTED_CODE + 4


def base_bytes(shape: ModelShape, quantization: str = "none", dtype: str = "fp32", double_quant: bool = False) -> int:
    return sum(param_bytes(p, quantization, dtype, double_quant) for p in shape.params())


# ------------------------------------------------------------------------------------------------ adapters
def _matches(path: str, targets) -> bool:
    """As ``align.adapters.targeting``: a regex string is matched in full, a list by name or path suffix."""
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    return any(path == t or path.endswith("." + t) for t in targets)


def adapter_params(shape: ModelShape, settings: dict) -> list[Param]:
    """The tensors of one LoRA / rsLoRA / DoRA adapter with these settings (an adapter group mapping)."""
    method = str(settings.get("method", "lora")).lower()
    if method not in LORA_METHODS:
        raise Unpredictable(f"adapter method {method!r} has no size rule here ({', '.join(LORA_METHODS)} have)")
    r, targets = int(settings.get("r", 8)), settings.get("target_modules") or "all-linear"
    dora = method == "dora" or bool(settings.get("use_dora", False))
    biased = {p.path for p in shape.params() if p.name == "bias"}
    out = []
    for p in shape.params():
        if p.features is None or p.name != "weight":
            continue
        hit = p.path != "lm_head" if targets == "all-linear" else _matches(p.path, targets)
        if not hit or _matches(p.path, settings.get("exclude_modules")):
            continue
        d_in, d_out = p.features
        out += [Param(p.path, "lora_A.weight", r * d_in, (d_in, r)), Param(p.path, "lora_B.weight", d_out * r)]
        if dora:
            out.append(Param(p.path, "lora_magnitude_vector", d_out))
        if settings.get("bias") == "lora_only" and p.path in biased:
            out.append(Param(p.path, "bias", d_out))
    if not out:
        raise Unpredictable(f"target_modules={targets!r} matches no Linear layer of this model")
    return out


# ------------------------------------------------------------------------------------------------ a stage
@dataclass(frozen=True)
class Role:
    """An adapter the stage holds: its settings, whether it trains, and its scalar head ('score' or 'value'; a
    trained role's head trains too). A role without a head is a language model: its loss reads vocabulary logits."""

    name: str
    settings: dict
    trainable: bool
    head: str | None = None


@dataclass(frozen=True)
class Workload:
    """One micro-batch with gradients: ``rows`` sequences of ``seq_len`` tokens, ``logit_positions`` of which get
    vocabulary logits, ``padded``: some row is shorter (an attention mask reaches SDPA); RL: ``generation_rows``
    sequences of ``generation_len`` tokens generated at a time."""

    rows: int
    seq_len: int
    logit_positions: int
    generation_rows: int = 0
    generation_len: int = 0
    chunk_size: int = 4096
    padded: bool = True


@dataclass(frozen=True)
class Zero:
    """The parts of a DeepSpeed JSON the memory depends on."""

    name: str
    stage: int
    offload_optimizer: bool = False
    offload_param: bool = False
    overlap_comm: bool = False
    sizes: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, name: str, ds: dict) -> Zero:
        z = ds.get("zero_optimization") or {}

        def on(key):
            return (z.get(key) or {}).get("device", "none") not in (None, "none")

        stage = int(z.get("stage", 0))
        return cls(name, stage, on("offload_optimizer"), on("offload_param"),
                   bool(z.get("overlap_comm", stage == 3)), {k: z.get(k) for k in DS_DEFAULTS})

    def size(self, key: str, hidden: int) -> int:
        value = self.sizes.get(key)
        if value == "auto":
            return DS_AUTO[key](hidden)
        return int(DS_DEFAULTS[key] if value is None else value)


@dataclass(frozen=True)
class Setup:
    """How the stage runs: ``model.quantization`` / ``model.dtype``, the loop's precision ('bf16': autocast), the
    optimizer, the ranks and the DeepSpeed ZeRO settings (None: plain PyTorch)."""

    quantization: str = "none"
    dtype: str = "fp32"
    precision: str = "fp32"
    optimizer: str = "adamw"
    ranks: int = 1
    zero: Zero | None = None

    def label(self) -> str:
        base = {"none": f"{self.dtype} base", "nf4": f"NF4 base ({self.dtype} compute)",
                "int8": f"int8 base ({self.dtype} compute)"}[self.quantization]
        ds = f"DeepSpeed {self.zero.name} (ZeRO-{self.zero.stage})" if self.zero else "no DeepSpeed"
        return f"per rank, {self.ranks} rank{'s' if self.ranks > 1 else ''}, {base}, {ds}"


@dataclass(frozen=True)
class StageMemory:
    """Bytes on one rank's device per part, and what lives on the host (offloaded)."""

    stage: str
    label: str
    roles: tuple[Role, ...]
    base: int
    adapters: int
    heads: int
    grads: int
    optimizer: int
    activations: int
    kv_cache: int = 0
    host: int = 0

    @property
    def total(self) -> int:
        return self.base + self.adapters + self.heads + self.grads + self.optimizer + max(self.activations,
                                                                                            self.kv_cache)

    def line(self) -> str:
        trains = ", ".join(r.name + (" + head" if r.head else "") for r in self.roles if r.trainable)
        frozen = ", ".join(r.name + (" + head" if r.head else "") for r in self.roles if not r.trainable)
        who = f"trains {trains}" + (f"; frozen {frozen}" if frozen else "")
        parts = [f"base {fmt(self.base)}", f"adapters {fmt(self.adapters)}"]
        if self.heads:
            parts.append(f"heads {fmt(self.heads)}")
        parts += [f"grads {fmt(self.grads)}", f"optimizer {fmt(self.optimizer)}"]
        if self.kv_cache:
            parts.append(f"max(activations ~{fmt(self.activations)}, KV cache {fmt(self.kv_cache)})")
        else:
            parts.append(f"activations ~{fmt(self.activations)}")
        total = fmt(self.total) if self.total < GiB else f"{self.total / GiB:.2f} GiB"
        return f"memory {self.stage} ({self.label}; {who}): {' + '.join(parts)} = ~{total} (host: {fmt(self.host)} offloaded)"


def fmt(n: int) -> str:
    if n == 0:
        return "0 MiB"
    if n < MiB:
        return f"{max(1, round(n / KiB))} KiB"
    if n < 10 * MiB:
        return f"{n / MiB:.1f} MiB"
    return f"{round(n / MiB)} MiB" if n < 10 * GiB else f"{n / GiB:.1f} GiB"


def optimizer_state_bytes(numels: list[int], name: str = "adamw") -> int:
    """AdamW's state for tensors of these sizes: two fp32 moments and an fp32 step per tensor (torch); bitsandbytes'
    AdamW8bit: two uint8 states with an fp32 absmax per 256 values, and two shared 256-value fp32 maps, for tensors
    of >= 4096 values, two fp32 states below that."""
    if name == "adamw_8bit":
        small = sum(8 * n for n in numels if n < ADAM8_MIN)
        big = [n for n in numels if n >= ADAM8_MIN]
        return small + sum(2 * n + 8 * math.ceil(n / ADAM8_BLOCK) for n in big) + (2 * 256 * 4 if big else 0)
    return sum(8 * n + 4 for n in numels)


def _layer_of(path: str) -> int | None:
    found = re.search(r"\.(?:layers|h)\.(\d+)\.", path + ".")
    return int(found.group(1)) if found else None


ADAPTER_INPUTS = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "c_attn": "attn", "o_proj": "out",
                  "attn.c_proj": "out", "gate_proj": "mlp", "up_proj": "mlp", "c_fc": "mlp", "down_proj": "down",
                  "mlp.c_proj": "down"}


def _short(path: str) -> str:
    """'model.layers.3.self_attn.q_proj' -> 'q_proj'; GPT-2's two c_proj layers keep their parent's name."""
    parts = path.split(".")
    return ".".join(parts[-2:]) if parts[-1] == "c_proj" else parts[-1]


def activation_parts(shape: ModelShape, adapter: list[Param], work: Workload, dtype: str = "fp32",
                     precision: str = "fp32", head: str | None = None, quantization: str = "none") -> dict[str, int]:
    """An estimate of one micro-batch's activations for one trained role: ``saved``, what autograd keeps for
    backward (checked against torch's saved-tensor hooks on a tiny Llama), and ``logits``, the chunked log-prob
    path's own buffers. Per layer, from the first adapted one on (earlier layers get no gradient), per token:

        fp32: 2H (the RMSNorms' inputs, upcast) + 2 (their rsqrt) + heads (SDPA's logsumexp)
        compute dtype (c = 2 B under bf16 / autocast, else 4 B): 2Q (q; the SDPA output, which o_proj's adapter
            keeps as its input too) + 2K (k, v: K = Q when padding makes transformers repeat them to all heads,
            else kv_heads x head_dim) + 3I (gate, silu(gate), up; GPT-2: I)
        adapter inputs: fp32 base: H for q/k/v, H for gate/up, I for down_proj, shared by the layers one tensor
            feeds (4 B); bf16 base: each adapted layer its own fp32 copy (in x 4 B); autocast: a bf16 copy each
        r per adapted layer (A's output)

    with H hidden, Q = heads x head_dim, I intermediate. Exact (to the byte, tests check it) for the shipped
    targets (all-linear, the Llama list, any set that adapts q/k/v of its first layer); a first adapted layer
    without q/k/v makes it an overestimate. SDPA keeps no T x T scores, but with padding
    (``work.padded``) it converts the mask per layer and keeps it: rows x T^2 x c per layer. Autocast on an fp32
    base (``precision=bf16``) also keeps a bf16 copy of every frozen Linear weight it casts (2 B per weight).
    Plus the final norm's input, the rotary tables and, for a language-model role, the selected hidden states
    (N x H, N response positions), the fp32 slice logits kept for backward when they fit in KEEP_LOGITS_BYTES
    (N x V x 4 B) and two (N, chunk) fp32 temporaries; a value head keeps its input (T x H per row). Not counted:
    temporaries of one layer's backward, the allocator's slack, kernels' workspaces."""
    h, q, i, heads = shape.hidden_size, shape.q_dim, shape.intermediate_size, shape.num_heads
    autocast = precision == "bf16"
    c = 2 if dtype == "bf16" or autocast else 4
    tokens = work.rows * work.seq_len
    layers: dict[int, list[Param]] = {}
    for p in adapter:
        if p.name == "lora_A.weight" and _layer_of(p.path) is not None:
            layers.setdefault(_layer_of(p.path), []).append(p)
    first = min(layers, default=shape.num_layers)
    widths = {"attn": h, "out": q, "mlp": h, "down": i}
    per_token = 0
    kv = shape.kv_dim if not work.padded else q  # unpadded, transformers lets SDPA broadcast the k/v heads
    for layer in range(first, shape.num_layers):
        fp32 = (2 * h + 2 if layer > first else h + 1) + heads
        compute = 2 * q + 2 * kv + (3 * i if shape.family != "gpt2" else i)
        inputs, groups = 0, set()
        for p in layers.get(layer, []):
            group = ADAPTER_INPUTS.get(_short(p.path))
            d_in, r = p.features
            inputs += r * (2 if autocast else 4)
            if autocast:
                inputs += 2 * d_in
            elif dtype == "bf16":
                inputs += 4 * d_in
            elif group not in groups and group != "out":
                groups.add(group)
                inputs += 4 * widths.get(group, d_in)
        per_token += 4 * fp32 + c * compute + inputs
    adapted = shape.num_layers - first
    saved = tokens * (per_token + 4 * (h + 1)) + 2 * work.seq_len * shape.head_dim * (2 if dtype == "bf16" else 4)
    if work.padded:
        saved += adapted * work.rows * work.seq_len ** 2 * c
    if autocast:  # weight casts kept for the input's gradient: none where the input needs none (q/k/v of the
        # first adapted layer, fed by a norm of the frozen stream)
        def needed(path: str) -> bool:
            return _layer_of(path) != first or ADAPTER_INPUTS.get(_short(path)) != "attn"

        saved += 2 * sum(p.numel for p in adapter if p.name != "lora_A.weight" or needed(p.path))
        if dtype == "fp32" and quantization == "none":
            saved += 2 * sum(p.numel for p in shape.params() if p.quantized and p.name == "weight" and needed(p.path))
    logits = 0
    if head == "value":
        saved += tokens * h * (2 if autocast else 4)
    elif head == "score":
        saved += work.rows * (h * (2 if autocast else 4) + 16)  # + the last tokens' int64 indices
    elif work.logit_positions:
        n, v = work.logit_positions, shape.vocab_size
        saved += n * (h * (2 if dtype == "bf16" else 4) + 13) + work.rows * work.seq_len  # + labels, lse, masks
        logits = (n * v * 4 if n * v * 4 <= KEEP_LOGITS_BYTES else 0) + 2 * n * min(work.chunk_size, v) * 4
    return {"saved": saved, "logits": logits}


def activation_bytes(shape: ModelShape, adapter: list[Param], work: Workload, dtype: str = "fp32",
                     precision: str = "fp32", head: str | None = None, quantization: str = "none") -> int:
    return sum(activation_parts(shape, adapter, work, dtype, precision, head, quantization).values())


def kv_cache_bytes(shape: ModelShape, rows: int, tokens: int, dtype: str) -> int:
    return 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * tokens * rows * DTYPE_BYTES[dtype]


# ------------------------------------------------------------------------------------------------ prediction
def _persistent(p: Param, shape: ModelShape, threshold: int) -> bool:
    """ZeRO-3 keeps a tensor whole on every rank: under the persistence threshold, or the output head (align keeps
    it whole; with tied embeddings that is the embedding matrix)."""
    head = ("model.embed_tokens", "transformer.wte") if shape.tie_word_embeddings else ("lm_head",)
    return p.numel < threshold or p.path in head


def predict(stage: str, shape: ModelShape, roles: list[Role], work: Workload, setup: Setup) -> StageMemory:
    """Bytes per part on one rank for these roles, this micro-batch and this precision / DeepSpeed setup."""
    h = shape.hidden_size
    adapters = {role.name: adapter_params(shape, role.settings) for role in roles}
    heads = {r.name: [h, 1] for r in roles if r.head}  # weight, bias
    trained = [p.numel for r in roles if r.trainable for p in adapters[r.name]]
    trained += [n for r in roles if r.trainable and r.head for n in heads[r.name]]
    activations = sum(activation_bytes(shape, adapters[r.name], work, setup.dtype, setup.precision, r.head,
                                       setup.quantization) for r in roles if r.trainable)
    kv = kv_cache_bytes(shape, work.generation_rows, work.generation_len, setup.dtype) if work.generation_rows else 0
    base_params = shape.params()
    adapter_list = [p for ps in adapters.values() for p in ps]
    base = sum(param_bytes(p, setup.quantization, setup.dtype) for p in base_params)
    adapter_bytes, head_bytes = 4 * sum(p.numel for p in adapter_list), 4 * sum(map(sum, heads.values()))
    zero, host = setup.zero, 0
    if zero is None:
        grads, optimizer = 4 * sum(trained), optimizer_state_bytes(trained, setup.optimizer)
    elif zero.stage == 2:
        grads, optimizer, host = _zero2(zero, sum(trained), setup.ranks, h)
    elif zero.stage == 3 and setup.quantization == "none":
        base, adapter_bytes, grads, optimizer, host = _zero3(zero, shape, adapter_list, sum(trained), setup)
    else:
        raise Unpredictable(f"DeepSpeed {zero.name}: ZeRO stage {zero.stage} with model.quantization="
                            f"{setup.quantization} has no rule here (ZeRO-2, and ZeRO-3 on an unquantized base, have)")
    return StageMemory(stage, setup.label(), tuple(roles), base, adapter_bytes, head_bytes, grads, optimizer,
                       activations, kv, host)


def _zero2(zero: Zero, trained: int, ranks: int, hidden: int) -> tuple[int, int, int]:
    """(grads, optimizer, host) under ZeRO-2: the params stay whole on every rank."""
    part = math.ceil(trained / ranks)
    bucket = zero.size("reduce_bucket_size", hidden) * 4 * (2 if zero.overlap_comm else 1)
    if zero.offload_optimizer:  # master + moments + grad partition + a staging copy, on the host
        return bucket, 0, 20 * part
    return 4 * part + bucket, 12 * part, 0  # fp32 master partition + two moments


def _zero3(zero: Zero, shape: ModelShape, adapters: list[Param], trained: int,
           setup: Setup) -> tuple[int, int, int, int, int]:
    """(base, adapters, grads, optimizer, host) under ZeRO-3: every tensor split over the ranks but the
    persistent ones; with several ranks one decoder layer is gathered whole at a time, and the next prefetched."""
    h, ranks, dtype = shape.hidden_size, setup.ranks, DTYPE_BYTES[setup.dtype]
    threshold = zero.size("stage3_param_persistence_threshold", h)
    base_params = shape.params()
    keep = sum(p.numel * dtype for p in base_params if _persistent(p, shape, threshold))
    split = sum(math.ceil(p.numel / ranks) * dtype for p in base_params if not _persistent(p, shape, threshold))
    a_keep = sum(4 * p.numel for p in adapters if p.numel < threshold)
    a_split = sum(4 * math.ceil(p.numel / ranks) for p in adapters if p.numel >= threshold)
    working = 0
    if ranks > 1:
        layer = sum(p.numel * dtype for p in base_params if _layer_of(p.path) == 0)
        layer += sum(4 * p.numel for p in adapters if _layer_of(p.path) == 0)
        working = layer + min(layer, zero.size("stage3_prefetch_bucket_size", h) * dtype)
    part, bucket = math.ceil(trained / ranks), zero.size("reduce_bucket_size", h) * 4
    if zero.offload_param:
        base, adapter_bytes, host = keep + working, a_keep, split + a_split
    else:
        base, adapter_bytes, host = keep + split + working, a_keep + a_split, 0
    if zero.offload_optimizer:  # the fp32 master is a copy on the host, with the moments and grad partition
        return base, adapter_bytes, bucket, 0, host + 16 * part
    return base, adapter_bytes, 4 * part + bucket, 8 * part, host  # the fp32 partition is the master


@contextlib.contextmanager
def saved_tensor_bytes(params):
    """Measure what the prediction's activation rule predicts: yields a dict whose 'bytes' is, after the block, the
    size of the distinct storages autograd saved for backward inside it, ``params``' own storages excluded."""
    import torch

    own = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}
    out = {"bytes": 0}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield out
    out["bytes"] = sum(seen.values())
