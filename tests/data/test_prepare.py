"""prepare_*: each layout from a real file end to end, the cache, and the user's files left untouched."""

import hashlib
import logging

import datasets
import pytest

import align.data.prepare as prepare_module
from align.config import ConfigError
from align.data import PromptCollator, prepare_preferences, prepare_prompts, prepare_sft

from .conftest import config, write_jsonl

HH = [
    {"chosen": "\n\nHuman: Hello\n\nAssistant: Sure thing", "rejected": "\n\nHuman: Hello\n\nAssistant: No."},
    {"chosen": "\n\nHuman: What is the capital of France?\n\nAssistant: Paris.",
     "rejected": "\n\nHuman: What is the capital of France?\n\nAssistant: Tell me a joke."},
]


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


UF = [{"prompt": "Hello", "chosen": [user("Hello"), bot("Sure")], "rejected": [user("Hello"), bot("No")],
       "score_chosen": 8.0, "score_rejected": 2.0}]


def tokens(tokenizer, ids):
    return tokenizer.convert_ids_to_tokens(list(ids))


def test_hh_jsonl(tmp_path, tokenizer):
    ds = prepare_preferences(config(write_jsonl(tmp_path / "hh.jsonl", HH)), tokenizer)
    assert ds.column_names == ["row", "prompt_ids", "chosen_ids", "rejected_ids"]
    assert tokens(tokenizer, ds[0]["prompt_ids"]) == ["<s>", "Ċ", "Ċ", "Human", ":", "ĠHello", "Ċ", "Ċ", "A",
                                                      "ssistan", "t", ":"]
    assert tokens(tokenizer, ds[0]["chosen_ids"]) == ["ĠSure", "Ġthing", "</s>"]
    assert tokens(tokenizer, ds[1]["chosen_ids"]) == ["ĠParis", ".", "</s>"]


def test_ultrafeedback_parquet(tmp_path, tokenizer):
    path = tmp_path / "uf.parquet"
    datasets.Dataset.from_list(UF).to_parquet(path)
    ds = prepare_preferences(config(path, tmp_path), tokenizer)
    assert tokens(tokenizer, ds[0]["prompt_ids"]) == ["<s>", "<|user|>", "Hello", "Ċ", "<|assistant|>"]
    assert tokens(tokenizer, ds[0]["chosen_ids"]) == ["Sure", "</s>", "Ċ"]
    assert tokens(tokenizer, ds[0]["rejected_ids"]) == ["No", "</s>", "Ċ"]


def test_plain_csv(tmp_path, plain):
    path = tmp_path / "prefs.csv"
    path.write_text('prompt,chosen,rejected\n"Question: hi\nAnswer:", Sure, No\n')
    ds = prepare_preferences(config(path, tmp_path), plain)
    assert tokens(plain, ds[0]["prompt_ids"]) == ["<s>", "Question", ":", "Ġhi", "Ċ", "A", "ns", "wer", ":"]
    assert tokens(plain, ds[0]["chosen_ids"]) == ["ĠSure", "</s>"]


def test_messages_from_a_save_to_disk_directory(tmp_path, tokenizer):
    rows = [{"messages": [user("Hello"), bot("Sure"), user("Tell me a joke."), bot("No")]}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "chats"))
    ds = prepare_sft(config(tmp_path / "chats"), tokenizer)
    ids, mask = ds[0]["input_ids"], ds[0]["response_mask"]
    assert tokenizer.decode(ids) == "<s><|user|>Hello\n<|assistant|>Sure</s>\n<|user|>Tell me a joke.\n<|assistant|>No</s>\n"
    # Only the last assistant turn counts; the earlier one is context.
    assert tokens(tokenizer, [t for t, m in zip(ids, mask) if m]) == ["No", "</s>", "Ċ"]


def test_prompts_for_rollouts_left_padded(tmp_path, tokenizer):
    rows = [{"messages": [user("Hello")]}, {"messages": [user("Tell me a joke."), bot("No")]}]
    ds = prepare_prompts(config(write_jsonl(tmp_path / "prompts.jsonl", rows)), tokenizer)
    batch = PromptCollator(tokenizer.pad_token_id)([ds[0], ds[1]])
    assert tokenizer.decode(batch["input_ids"][0]) == "<pad><pad><pad><pad><s><|user|>Hello\n<|assistant|>"
    assert tokenizer.decode(batch["input_ids"][1]) == "<s><|user|>Tell me a joke.\n<|assistant|>"
    # HH transcripts give their prompts too (for PPO on HH).
    hh = prepare_prompts(config(write_jsonl(tmp_path / "hh.jsonl", HH)), tokenizer)
    assert tokenizer.decode(hh[1]["prompt_ids"]) == "<s>\n\nHuman: What is the capital of France?\n\nAssistant:"


def test_eval_split_and_format_mismatch(tmp_path, tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", HH)
    evaluation = write_jsonl(tmp_path / "eval.jsonl", HH[:1])
    cfg = config(train, eval=str(evaluation))
    assert len(prepare_preferences(cfg, tokenizer, split="eval")) == 1
    with pytest.raises(ConfigError, match=r"^data.format='prompt': expected one of \('auto', 'preference'\)"):
        prepare_preferences(config(train, format="prompt"), tokenizer)
    with pytest.raises(ConfigError, match=r"^data.eval=None"):
        prepare_preferences(config(train), tokenizer, split="eval")


def test_cache_hit_skips_tokenization(tmp_path, tokenizer, monkeypatch, caplog):
    calls = []
    real = prepare_module.tokenize_examples
    monkeypatch.setattr(prepare_module, "tokenize_examples", lambda *a, **k: calls.append(1) or real(*a, **k))
    path = write_jsonl(tmp_path / "prefs.jsonl", [*HH, {"chosen": HH[0]["chosen"], "rejected": HH[0]["chosen"]}])
    cfg = config(path, tmp_path, on_bad_rows="skip")
    first = prepare_preferences(cfg, tokenizer)
    assert len(calls) == 1
    with caplog.at_level(logging.INFO, logger="align.data"):
        second = prepare_preferences(cfg, tokenizer)
    assert len(calls) == 1  # served from cache_dir/tokenized/<key>
    assert second[:] == first[:]
    assert "dropped 1 (chosen == rejected)" in caplog.text and "(from the tokenized-data cache)" in caplog.text
    prepare_preferences(config(path, tmp_path, on_bad_rows="skip", max_length=1024), tokenizer)
    assert len(calls) == 2  # new settings, new entry
    write_jsonl(path, HH)
    assert len(prepare_preferences(cfg, tokenizer)) == 2
    assert len(calls) == 3  # new content, new entry
    tokenizer.chat_template = tokenizer.chat_template + " "
    prepare_preferences(cfg, tokenizer)
    assert len(calls) == 4  # another tokenizer, new entry


def test_the_users_files_are_never_modified(tmp_path, tokenizer):
    data = tmp_path / "data"
    data.mkdir()
    path = write_jsonl(data / "prefs.jsonl", [*HH, {"chosen": "x", "rejected": "x"}])
    before = hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns
    prepare_preferences(config(path, tmp_path, on_bad_rows="skip"), tokenizer)
    prepare_preferences(config(path, tmp_path, on_bad_rows="skip"), tokenizer)
    assert (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns) == before
    assert sorted(p.name for p in data.iterdir()) == ["prefs.jsonl"]
