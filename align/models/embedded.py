"""The embedded task's tiny base: a Llama-style model pretrained from scratch on the review world's corpus.

Built once per (world version, task config, base config) and cached as an ordinary transformers model directory
(model + tokenizer), with the task's JSONL splits beside it, so every later stage loads it like a real model.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from align.config.embedded import EmbeddedBaseConfig, EmbeddedTaskConfig
from align.data.synthetic import WORLD_VERSION, build_tokenizer, write_splits
from align.durable import fsync_tree

BUILD_REPORT = "build.json"


@dataclass(frozen=True)
class EmbeddedBase:
    """Where a built base lives: ``model_dir`` holds the model and tokenizer, ``data_dir`` the task's splits."""

    model_dir: Path
    data_dir: Path
    report: dict


def default_cache_root() -> Path:
    return Path(os.environ.get("ALIGN_CACHE", Path.home() / ".cache" / "align"))


def cache_key(task: EmbeddedTaskConfig, cfg: EmbeddedBaseConfig) -> str:
    blob = json.dumps({"world": WORLD_VERSION, "task": asdict(task), "base": asdict(cfg)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def build_embedded_base(task: EmbeddedTaskConfig | None = None, cfg: EmbeddedBaseConfig | None = None,
                        cache_root: str | Path | None = None, progress: bool = True) -> EmbeddedBase:
    """Return the cached base for these configs, building it (splits, tokenizer, pretraining) if absent."""
    task, cfg = task or EmbeddedTaskConfig(), cfg or EmbeddedBaseConfig()
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    final = root / f"embedded-{cache_key(task, cfg)}"
    if (final / BUILD_REPORT).is_file():
        return EmbeddedBase(final / "model", final / "data", json.loads((final / BUILD_REPORT).read_text()))
    work = root / f".building-{final.name}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    start = time.perf_counter()
    paths = write_splits(task, work / "data")
    tokenizer = build_tokenizer()
    train_texts = _read_texts(paths["pretrain"])
    eval_texts = _read_texts(paths["pretrain_eval"])
    model = _new_model(cfg, tokenizer)
    _pretrain(model, tokenizer, train_texts, cfg, progress)
    report = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "steps": cfg.steps,
        "tokens_seen": cfg.steps * cfg.batch_size * cfg.block_size,
        **held_out_perplexity(model, tokenizer, eval_texts, train_texts),
    }
    report["build_seconds"] = round(time.perf_counter() - start, 1)
    model.save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    (work / BUILD_REPORT).write_text(json.dumps(report, indent=2))
    if final.exists():  # another process finished first: keep theirs
        shutil.rmtree(work, ignore_errors=True)
    else:
        fsync_tree(work)  # flushed before the rename: a crash leaves no half-written base under the final name
        work.rename(final)
    return EmbeddedBase(final / "model", final / "data", json.loads((final / BUILD_REPORT).read_text()))


def _read_texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


def _new_model(cfg: EmbeddedBaseConfig, tokenizer: PreTrainedTokenizerBase) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        return LlamaForCausalLM(config)


def _document_ids(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """<bos> words <eos> per document."""
    return [ids + [tokenizer.eos_token_id] for ids in tokenizer(texts)["input_ids"]]


def _pretrain(model: LlamaForCausalLM, tokenizer, texts: list[str], cfg: EmbeddedBaseConfig, progress: bool) -> None:
    stream = torch.tensor([t for doc in _document_ids(tokenizer, texts) for t in doc])
    blocks = stream[: len(stream) // cfg.block_size * cfg.block_size].view(-1, cfg.block_size)  # (N, block)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_with_warmup(s, cfg.warmup_steps, cfg.steps))
    model.train()
    bar = tqdm(range(cfg.steps), desc="pretraining the embedded base", disable=not progress)
    for step in bar:
        batch = blocks[torch.randint(len(blocks), (cfg.batch_size,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()


def _cosine_with_warmup(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@torch.no_grad()
def held_out_perplexity(model, tokenizer, eval_texts: list[str], train_texts: list[str]) -> dict:
    """Per-document perplexity of the model on held-out reviews (every token after <bos>, <eos> included), next to
    the uniform and unigram baselines (the unigram fitted on the training texts, add-one smoothed)."""
    docs = _document_ids(tokenizer, eval_texts)
    nll, count = 0.0, 0
    for i in range(0, len(docs), 64):
        chunk = docs[i:i + 64]
        width = max(map(len, chunk))
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id)
        for row, doc in enumerate(chunk):
            ids[row, : len(doc)] = torch.tensor(doc)
        mask = ids != tokenizer.pad_token_id
        logits = model(input_ids=ids, attention_mask=mask.long()).logits[:, :-1].float()
        token_nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        nll += token_nll[mask[:, 1:]].sum().item()
        count += int(mask[:, 1:].sum())
    counts = torch.ones(len(tokenizer))
    for doc in _document_ids(tokenizer, train_texts):
        counts += torch.bincount(torch.tensor(doc[1:]), minlength=len(tokenizer))
    logp = (counts / counts.sum()).log()
    unigram = -sum(logp[torch.tensor(doc[1:])].sum().item() for doc in docs) / count
    return {"perplexity": round(math.exp(nll / count), 3), "unigram_perplexity": round(math.exp(unigram), 3),
            "uniform_perplexity": float(len(tokenizer)), "eval_tokens": count}
