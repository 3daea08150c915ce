"""Local tokenizers (byte-level BPE trained on a few sentences, nothing downloaded) and file helpers."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import datasets
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from align.config import DataConfig

SPECIAL = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
CORPUS = [
    "Hello there, how are you?", "I am fine, thank you.", "Sure, here is a poem about the sea.",
    "What is the capital of France?", "The capital of France is Paris.", "Tell me a joke.",
    "Why did the chicken cross the road?", "No, I will not do that.", "Sure thing, Paris it is.",
    "Human: Hello Assistant: Sure", "Question: hi Answer: Sure", "Good bye and good night.",
]
# Each turn is <|role|>content, an assistant turn ends with EOS, every turn with a newline; the
# generation prompt is exactly the start of an assistant turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 20, trainer)
    return tok.to_str()


def make_tokenizer(chat_template: str | None = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """A fresh tokenizer: BOS <s>, EOS </s>, PAD <pad>, and ``chat_template`` (None: plain only)."""
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
                                        bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture(autouse=True)
def _private_datasets_cache(tmp_path, monkeypatch):
    """`datasets` writes its Arrow cache under tmp_path, not the user's ~/.cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")


@pytest.fixture
def tokenizer() -> PreTrainedTokenizerFast:
    """With the chat template: messages and string prompt/response pairs are templated."""
    return make_tokenizer()


@pytest.fixture
def plain() -> PreTrainedTokenizerFast:
    """No chat template: plain concatenation, BOS + prompt, response + EOS."""
    return make_tokenizer(chat_template=None)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def config(path: Path | str, tmp_path: Path | None = None, **overrides) -> DataConfig:
    """A DataConfig for ``path``; with ``tmp_path`` the caches live under it."""
    cache = {"cache_dir": str(tmp_path / "cache")} if tmp_path is not None else {}
    return DataConfig(train=str(path), **{**cache, **overrides})
