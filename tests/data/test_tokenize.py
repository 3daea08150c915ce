"""Tokenization with an exact boundary, explicit truncation, masks, collators and packing."""

import datasets
import pytest
import torch

from align.data import (
    DataError,
    Example,
    PreferenceCollator,
    PromptCollator,
    SFTCollator,
    pack_sft,
    prepare_sft,
    tokenize_examples,
    truncate,
)
from align.data.collate import pack_bins
from align.data.tokenize import Tokenized

from .conftest import config, make_tokenizer, write_jsonl


def tokens(tokenizer, ids):
    return tokenizer.convert_ids_to_tokens(list(ids))


def test_plain_example_is_bos_prompt_then_response_eos(plain):
    (t,) = tokenize_examples([Example(3, "Hello", chosen=" Sure", rejected=" No")], plain)
    assert t.row == 3
    assert tokens(plain, t.prompt_ids) == ["<s>", "Hello"]
    assert tokens(plain, t.responses["chosen"]) == ["ĠSure", "</s>"]
    assert tokens(plain, t.responses["rejected"]) == ["Ġ", "No", "</s>"]
    assert t.prompt_ids == (1, 306) and t.responses["chosen"] == (298, 2)  # <s>=1, </s>=2


def test_chat_example_goes_through_the_template(tokenizer):
    prompt = ({"role": "user", "content": "Hello"},)
    (t,) = tokenize_examples([Example(1, prompt, completion=({"role": "assistant", "content": "Sure"},))], tokenizer)
    assert tokens(tokenizer, t.prompt_ids) == ["<s>", "<|user|>", "Hello", "Ċ", "<|assistant|>"]
    assert tokens(tokenizer, t.responses["completion"]) == ["Sure", "</s>", "Ċ"]  # the template's EOS, once


def test_conversation_without_a_chat_template_says_what_to_do():
    example = Example(2, ({"role": "user", "content": "Hello"},), completion=({"role": "assistant", "content": "x"},))
    with pytest.raises(DataError, match="row 2 is a conversation but the tokenizer has no chat template"):
        tokenize_examples([example], make_tokenizer(chat_template=None))


def test_truncation_keeps_the_prompt_end_and_its_bos(plain):
    (t,) = tokenize_examples([Example(1, "The capital of France is Paris.", chosen=" Sure thing, Paris it is.",
                                      rejected=" No.")], plain)
    assert tokens(plain, t.prompt_ids) == ["<s>", "The", "Ġcapital", "Ġof", "ĠFrance", "Ġis", "ĠParis", "."]
    cut = truncate(t, max_length=8, max_prompt_length=4, bos_id=plain.bos_token_id)
    assert tokens(plain, cut.prompt_ids) == ["<s>", "Ġis", "ĠParis", "."]  # BOS + the last 3 tokens
    # 8 - 4 = 4 response tokens for chosen and for rejected: the same budget.
    assert tokens(plain, cut.responses["chosen"]) == ["ĠSure", "Ġthing", ",", "ĠParis"]
    assert tokens(plain, cut.responses["rejected"]) == ["Ġ", "No", ".", "</s>"]  # fits exactly
    assert cut.truncated == {"prompt", "chosen"}


def test_truncation_by_hand_without_bos():
    """Prompt 5 tokens, limit 3 -> the last 3; max_length 5 -> 2 response tokens; short responses untouched."""
    example = Tokenized(1, (10, 11, 12, 13, 14), {"chosen": (20, 21, 22), "rejected": (30,)})
    cut = truncate(example, max_length=5, max_prompt_length=3, bos_id=None)
    assert cut.prompt_ids == (12, 13, 14)
    assert cut.responses == {"chosen": (20, 21), "rejected": (30,)}
    assert cut.truncated == {"prompt", "chosen"}
    assert truncate(example, 100, 50, None) == example  # nothing over the limits: unchanged


def test_sft_masks_cover_exactly_the_response(tmp_path, plain):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "Hello", "completion": " Sure"},
                                                {"prompt": "Tell me a joke.", "completion": " No."}])
    ds = prepare_sft(config(path), plain)
    assert ds[0] == {"row": 1, "input_ids": [1, 306, 298, 2], "response_mask": [False, False, True, True]}
    batch = SFTCollator(pad_token_id=0)([ds[0], ds[1]])
    joke = plain("Tell me a joke.", add_special_tokens=False)["input_ids"]  # 5 tokens
    no = plain(" No.", add_special_tokens=False)["input_ids"]  # 3 tokens
    assert batch["input_ids"].tolist() == [[1, 306, 298, 2, 0, 0, 0, 0, 0, 0],
                                           [1, *joke, *no, 2]]
    assert batch["attention_mask"].tolist() == [[1] * 4 + [0] * 6, [1] * 10]
    assert batch["labels"].tolist() == [[-100, -100, 298, 2] + [-100] * 6, [-100] * 6 + [*no, 2]]
    assert batch["response_mask"].tolist() == [[False, False, True, True] + [False] * 6, [False] * 6 + [True] * 4]


def test_text_rows_train_on_everything_but_bos(tmp_path, plain):
    ds = prepare_sft(config(write_jsonl(tmp_path / "text.jsonl", [{"text": "Good bye and good night."}])), plain)
    body = plain("Good bye and good night.", add_special_tokens=False)["input_ids"]
    assert ds[0]["input_ids"] == [1, *body, 2]
    assert ds[0]["response_mask"] == [False] + [True] * (len(body) + 1)


def test_preference_collator_puts_chosen_first():
    rows = [{"prompt_ids": [1, 5], "chosen_ids": [7, 2], "rejected_ids": [8, 9, 2]},
            {"prompt_ids": [1, 6, 6], "chosen_ids": [2], "rejected_ids": [9, 2]}]
    batch = PreferenceCollator(pad_token_id=0)(rows)
    assert batch["input_ids"].tolist() == [[1, 5, 7, 2, 0], [1, 6, 6, 2, 0],      # chosen 0, chosen 1
                                           [1, 5, 8, 9, 2], [1, 6, 6, 9, 2]]      # rejected 0, rejected 1
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1] * 5, [1] * 5]
    assert batch["response_mask"].int().tolist() == [[0, 0, 1, 1, 0], [0, 0, 0, 1, 0], [0, 0, 1, 1, 1], [0, 0, 0, 1, 1]]
    assert batch["response_mask"].dtype == torch.bool


def test_prompt_collator_pads_left():
    batch = PromptCollator(pad_token_id=0)([{"prompt_ids": [1, 5, 6]}, {"prompt_ids": [1]}])
    assert batch["input_ids"].tolist() == [[1, 5, 6], [0, 0, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_pack_bins_best_fit_decreasing():
    """Lengths 5, 3, 4, 2 into 7: 5 opens bin 0 (2 left), 4 opens bin 1 (3 left), 3 fills bin 1, 2 fills bin 0."""
    assert pack_bins([5, 3, 4, 2], 7) == [[0, 3], [2, 1]]


def test_packing_restarts_positions_and_masks_example_starts():
    ds = datasets.Dataset.from_dict({"row": [1, 2, 3], "input_ids": [[1, 10, 11], [1, 20], [1, 30, 31, 32]],
                                     "response_mask": [[False, True, True], [False, True], [False, False, True, True]]})
    packed = pack_sft(ds, max_length=6)
    assert packed["row"] == [[2, 3], [1]]  # bins by best fit, examples in source order inside a row
    assert packed[0]["input_ids"] == [1, 20, 1, 30, 31, 32]
    assert packed[0]["position_ids"] == [0, 1, 0, 1, 2, 3]
    assert packed[0]["response_mask"] == [False, True, False, False, True, True]
    batch = SFTCollator(pad_token_id=0)([packed[0], packed[1]])
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 2, 3], [0, 1, 2, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 20, -100, -100, 31, 32], [-100, 10, 11, -100, -100, -100]]


def test_prepare_sft_with_packing(tmp_path, plain):
    rows = [{"prompt": "Hello", "completion": " Sure"}, {"prompt": "Hello", "completion": " No."}]
    ds = prepare_sft(config(write_jsonl(tmp_path / "sft.jsonl", rows), packing=True, max_length=16,
                            max_prompt_length=8), plain)
    assert len(ds) == 1 and ds[0]["row"] == [1, 2]
    assert ds[0]["position_ids"] == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5]  # <s> Hello ĠSure </s>, <s> Hello Ġ No . </s>


def test_collators_need_a_pad_id():
    with pytest.raises(ValueError, match=r"pad_token_id=None: expected an int; the tokenizer has no pad token"):
        PreferenceCollator(pad_token_id=None)


def test_string_pairs_use_the_chat_template_when_there_is_one(tokenizer, plain):
    example = Example(1, "Hello", completion="Sure")
    (templated,) = tokenize_examples([example], tokenizer)
    assert tokens(tokenizer, templated.prompt_ids) == ["<s>", "<|user|>", "Hello", "Ċ", "<|assistant|>"]
    assert tokens(tokenizer, templated.responses["completion"]) == ["Sure", "</s>", "Ċ"]
    (concatenated,) = tokenize_examples([example], plain)
    assert tokens(plain, concatenated.prompt_ids) == ["<s>", "Hello"]
    assert tokens(plain, concatenated.responses["completion"]) == ["Sure", "</s>"]


def test_formatted_text_is_never_templated(tokenizer):
    hh = Example(1, "\n\nHuman: Hello\n\nAssistant:", chosen=" Sure", rejected=" No", raw=True)
    text = Example(2, "", completion="Good bye.", raw=True)
    (t_hh, t_text) = tokenize_examples([hh, text], tokenizer)
    assert tokenizer.decode(t_hh.prompt_ids) == "<s>\n\nHuman: Hello\n\nAssistant:"
    assert tokenizer.decode(t_text.prompt_ids + t_text.responses["completion"]) == "<s>Good bye.</s>"
