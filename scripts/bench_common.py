"""Shared pieces of the benchmarks (``scripts/bench_*.py``): machine facts, benchmark models, isolated measurement
processes, A/B alternation with medians and ratios, and the markdown tables written into ``docs/benchmarks.md``.

Rules every benchmark follows (docs/benchmarks.md): a claim is a ratio measured in one run on the same machine,
model, data and batch; ours and the peer alternate (A B A B ...) and each side's median is reported with the ratio of
the medians; memory is the peak RSS of a fresh process that does only that measurement; no timing is ever asserted
in tests.

A measurement is a function run in its own process: ``isolated(module, function, kwargs)`` starts
``python -m <module> --child <function> <json kwargs>``; the child prints one JSON line (its result plus
``peak_rss_mib``), which the parent parses. Benchmark modules call ``child_main(globals())`` under ``__main__`` to
serve those calls.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS_MD = REPO / "docs" / "benchmarks.md"


# ------------------------------------------------------------------------------------------------ machine
def machine_info() -> dict:
    import torch

    info = {"date": time.strftime("%Y-%m-%d"), "python": platform.python_version(), "torch": torch.__version__,
            "cpu": _cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    for package in ("transformers", "peft", "trl", "bitsandbytes", "deepspeed"):
        try:
            info[package] = __import__(package).__version__
        except Exception:  # noqa: BLE001 - a missing optional peer is reported as absent
            info[package] = None
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_line(info: dict) -> str:
    parts = [f"{info['cpu']}, {info['cores']} cores, {info['torch_threads']} torch threads"]
    if info.get("cuda"):
        parts.append(info["cuda"])
    parts.append(", ".join(f"{k} {info[k]}" for k in ("torch", "transformers", "peft", "trl", "bitsandbytes")
                           if info.get(k)))
    return "; ".join(parts)


# ------------------------------------------------------------------------------------------------ models
@dataclass(frozen=True)
class BenchModel:
    """A Llama-architecture benchmark model built locally with random weights."""

    name: str
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int = 32000

    def config(self):
        from transformers import LlamaConfig

        return LlamaConfig(vocab_size=self.vocab, hidden_size=self.hidden, num_hidden_layers=self.layers,
                           num_attention_heads=self.heads, num_key_value_heads=self.heads,
                           intermediate_size=self.intermediate, max_position_embeddings=2048,
                           tie_word_embeddings=False)

    def build(self, seed: int = 0):
        import torch
        from transformers import LlamaForCausalLM

        torch.manual_seed(seed)
        model = LlamaForCausalLM(self.config())
        model.requires_grad_(False)
        return model.eval()

    @property
    def attention_weights(self) -> int:
        """Weights of one layer's q, k, v and o projections."""
        return 4 * self.hidden * self.hidden

    @property
    def parameters(self) -> int:
        h, v, i, n = self.hidden, self.vocab, self.intermediate, self.layers
        per_layer = 4 * h * h + 3 * h * i + 2 * h
        return 2 * v * h + n * per_layer + h


@dataclass(frozen=True)
class RealBenchModel:
    """The real SmolLM2-135M-Instruct (fetched from its PyPI wheel and converted once: align.models.convert),
    with the attributes of ``BenchModel`` so every benchmark takes ``--model smollm2``."""

    name: str = "smollm2"
    hidden: int = 576
    layers: int = 30
    heads: int = 9
    intermediate: int = 1536
    vocab: int = 49152
    kv_heads: int = 3

    @staticmethod
    def path():
        from align.models.convert import smollm2_dir

        return smollm2_dir()

    def config(self):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self.path())

    def build(self, seed: int = 0):
        import torch
        from transformers import AutoModelForCausalLM

        torch.manual_seed(seed)  # the weights are the real ones; the seed only fixes what is drawn afterwards
        model = AutoModelForCausalLM.from_pretrained(self.path(), dtype=torch.float32)
        model.requires_grad_(False)
        return model.eval()

    @property
    def attention_weights(self) -> int:  # grouped-query attention: k and v have 3 of the 9 heads
        return 2 * self.hidden * self.hidden + 2 * self.hidden * (self.hidden * self.kv_heads // self.heads)

    @property
    def parameters(self) -> int:  # tied embeddings
        h, v, i, n = self.hidden, self.vocab, self.intermediate, self.layers
        return v * h + n * (self.attention_weights + 3 * h * i + 2 * h) + h


# ~5M and ~25M parameters with a 32k vocabulary (where the log-prob computation over the vocabulary matters), and a
# ~170M model for memory comparisons in which the weights, not the Python runtime, dominate a process
MODELS = {
    "5m": BenchModel("5m", hidden=64, layers=4, heads=4, intermediate=172),
    "25m": BenchModel("25m", hidden=256, layers=10, heads=8, intermediate=688),
    "170m": BenchModel("170m", hidden=1024, layers=8, heads=16, intermediate=2816),
    "smollm2": RealBenchModel(),
}


# ------------------------------------------------------------------------------------------------ processes
def peak_rss_mib() -> float:
    """The process's peak resident memory (VmHWM), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def status_mib(key: str) -> float:
    """A /proc/self/status memory figure in MiB: ``VmRSS`` (now) or ``VmHWM`` (peak since the last reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def isolated(module: str, function: str, kwargs: dict, env: dict | None = None, timeout: int = 1800,
             python: str | Path | None = None) -> dict:
    """Run ``module.function(**kwargs)`` in a fresh Python process and return its JSON result (with peak RSS).
    ``python``: the interpreter to run it with (another environment, e.g. a peer library's); this one by default."""
    proc = subprocess.run([str(python or sys.executable), "-m", module, "--child", function, json.dumps(kwargs)],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{module}.{function}({kwargs}) failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def child_main(namespace: dict) -> bool:
    """Serve ``--child <function> <json>`` calls; True when this process was a child (the caller returns)."""
    if len(sys.argv) >= 4 and sys.argv[1] == "--child":
        result = namespace[sys.argv[2]](**json.loads(sys.argv[3]))
        result["peak_rss_mib"] = round(peak_rss_mib(), 1)
        print(json.dumps(result), flush=True)
        return True
    return False


# ------------------------------------------------------------------------------------------------ A/B
@dataclass
class Comparison:
    """Alternating measurements of two sides; ``ratio`` is ours / theirs of the medians of ``key``."""

    ours: list[dict]
    theirs: list[dict]

    def median(self, side: str, key: str) -> float:
        return statistics.median(r[key] for r in getattr(self, side))

    def ratio(self, key: str) -> float:
        return self.median("ours", key) / self.median("theirs", key)


def alternate(run_ours: Callable[[], dict], run_theirs: Callable[[], dict], repeats: int) -> Comparison:
    """A B A B ...: ``repeats`` measurements of each side, interleaved so drifts in machine load hit both."""
    ours, theirs = [], []
    for i in range(repeats):
        first, second = (run_ours, run_theirs) if i % 2 == 0 else (run_theirs, run_ours)
        a, b = first(), second()
        (ours if first is run_ours else theirs).append(a)
        (theirs if first is run_ours else ours).append(b)
    return Comparison(ours, theirs)


# ------------------------------------------------------------------------------------------------ output
def table(header: list[str], rows: list[list]) -> str:
    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(name: str, markdown: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace (or append) the block between ``<!-- bench:<name> -->`` and ``<!-- /bench:<name> -->``."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{markdown.strip()}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
