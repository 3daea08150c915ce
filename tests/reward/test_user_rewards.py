"""Rewards the user brings: callables from files and modules, prompt-file columns, built-in rules, weighted sums,
the sequence-classifier reward, and the errors each bad input gives (naming the key, the function, the item)."""

from __future__ import annotations

import json
import math
import sys
import textwrap

import pytest
import torch

from align.config.compose import compose_run_config
from align.config.errors import ConfigError
from reward.functions import PromptColumns, build_reward, check_reward_spec, checked

PROMPTS = ["What is 2 + 2?", "What is 3 * 3?"]


@pytest.fixture
def reward_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(textwrap.dedent("""
        import numpy as np

        def has_answer(prompts, responses, answer):
            return [1.0 if a in r else 0.0 for r, a in zip(responses, answer)]

        def words(prompts, responses):
            return np.array([float(len(r.split())) for r in responses])

        def echo_prompt_length(prompts, responses, **columns):
            return [float(len(p)) + len(columns) for p in prompts]

        def short(prompts, responses):
            return [1.0]

        def nan(prompts, responses):
            return [0.0, float("nan")]

        def text(prompts, responses):
            return [0.0, "high"]

        NOT_A_FUNCTION = 3
    """))
    return path


def columns() -> PromptColumns:
    """Rows 1 and 2 known by their words and by a templated text, with an answer column each."""
    keys = [[PROMPTS[0], f"user\n{PROMPTS[0]}\nassistant\n"], [PROMPTS[1], f"user\n{PROMPTS[1]}\nassistant\n"]]
    return PromptColumns.build(keys, PROMPTS, [{"answer": "4"}, {"answer": "9"}], [1, 2], "prompts.jsonl")


def test_file_callable_gets_its_column_in_prompt_order(reward_file):
    reward = build_reward(f"{reward_file}:has_answer", "trainer.grpo.reward", columns())
    # the trainers pass templated text; the function sees the rows' answers in that order
    out = reward([f"user\n{PROMPTS[1]}\nassistant\n", PROMPTS[0]], ["It is 9.", "It is 5."])
    torch.testing.assert_close(out, torch.tensor([1.0, 0.0]))


def test_function_without_columns_gets_none_and_sees_the_prompt_words(reward_file):
    reward = build_reward(f"{reward_file}:echo_prompt_length", "eval.reward", columns())
    out = reward([f"user\n{PROMPTS[0]}\nassistant\n"], ["x"])
    assert out.tolist() == [len(PROMPTS[0]) + 1]  # **columns: every column (answer) is passed
    numpy_out = build_reward(f"{reward_file}:words", "eval.reward", columns())(PROMPTS, ["a b c", ""])
    assert numpy_out.tolist() == [3.0, 0.0]


def test_module_callable(tmp_path, monkeypatch, reward_file):
    monkeypatch.syspath_prepend(str(reward_file.parent))
    sys.modules.pop("my_rewards", None)
    reward = build_reward("my_rewards:words", "trainer.ppo.reward")
    assert reward(PROMPTS, ["one two", "three"]).tolist() == [2.0, 1.0]


def test_weighted_sum_by_hand(reward_file):
    """0.5 * has_answer + 2 * length(target 2, penalty 0.25) + regex('^It'):
    'It is 4.' -> 0.5*1 + 2*(-0.25*|3-2|) + 1 = 1.0;  'nine' -> 0 + 2*(-0.25*|1-2|) + 0 = -0.5."""
    spec = [{"name": f"{reward_file}:has_answer", "weight": 0.5}, {"name": "length", "target": 2, "penalty": 0.25,
                                                                   "weight": 2}, {"name": "regex", "pattern": "^It"}]
    out = build_reward(spec, "trainer.grpo.reward", columns())(PROMPTS, ["It is 4.", "nine"])
    torch.testing.assert_close(out, torch.tensor([1.0, -0.5]))


def test_rules_by_hand():
    assert build_reward({"name": "length", "target": 3, "penalty": 0.5}, "k")(["p"] * 2, ["a b", "a b c d e"]).tolist() \
        == [-0.5, -1.0]
    regex = build_reward({"name": "regex", "pattern": r"\d+", "full": True}, "k")
    assert regex(["p"] * 3, ["42", " 42 ", "42 apples"]).tolist() == [1.0, 1.0, 0.0]
    exact = build_reward("exact_match", "k", columns())
    assert exact(PROMPTS, ["  4 ", "nine"]).tolist() == [1.0, 0.0]
    strict = build_reward({"name": "exact_match", "normalize": False}, "k", columns())
    assert strict(PROMPTS, [" 4", "9"]).tolist() == [0.0, 1.0]


@pytest.mark.parametrize(("fn", "message"), [
    ("short", r"reward .*:short returned 1 values for 2 responses"),
    ("nan", r"reward .*:nan: item 1 \(prompt 'What is 3 \* 3\?'\) is nan: rewards must be finite"),
    ("text", r"reward .*:text: item 1 \(prompt 'What is 3 \* 3\?'\) is 'high', not a number"),
])
def test_bad_outputs_name_the_function_and_the_first_bad_item(reward_file, fn, message):
    with pytest.raises(ValueError, match=message):
        build_reward(f"{reward_file}:{fn}", "k")(PROMPTS, ["a", "b"])


@pytest.mark.parametrize(("spec", "message"), [
    ("/nowhere/rewards.py:fn", r"k: /nowhere/rewards.py:fn: no such file"),
    ("no_such_module_xyz:fn", r"cannot import 'no_such_module_xyz'"),
    ("{file}:missing", r"has no attribute 'missing' \(its functions: .*has_answer"),
    ("{file}:NOT_A_FUNCTION", r"'NOT_A_FUNCTION' is a int, not a function"),
    ("lenght", r"k='lenght': not a reward: .*did you mean 'length'"),
    ({"name": "length", "target": 3, "size": 2}, r"k.size: length has no parameter 'size' \(its parameters: target, penalty"),
    ({"name": "regex", "pattern": "("}, r"k \(regex\): pattern='\(' is not a regular expression"),
    ({"name": "length", "weight": "heavy"}, r"k.weight='heavy': expected a finite number"),
    ([], r"k: an empty list of rewards"),
    (["model", "length"], r"k\[0\]: 'model' \(the reward model\) cannot be summed"),
])
def test_bad_specs_are_refused_naming_the_key(reward_file, spec, message):
    if isinstance(spec, str):
        spec = spec.replace("{file}", str(reward_file))
    with pytest.raises(ValueError, match=message):
        check_reward_spec(spec, "k")


def test_broken_import_names_the_file(tmp_path):
    bad = tmp_path / "broken.py"
    bad.write_text("import not_a_real_package_abc\n")
    with pytest.raises(ValueError, match=r"importing .*broken.py failed: ModuleNotFoundError"):
        check_reward_spec(f"{bad}:fn", "k")


def test_missing_column_and_unknown_prompt(reward_file):
    no_columns = PromptColumns.build([[PROMPTS[0]]], [PROMPTS[0]], [{}], [1], "prompts.jsonl")
    with pytest.raises(ValueError, match=r"needs the column\(s\) \['answer'\] from the prompts file \(columns there: none"):
        build_reward(f"{reward_file}:has_answer", "k", no_columns)([PROMPTS[0]], ["4"])
    with pytest.raises(ValueError, match=r"prompt 0 \('Something else'\) is not one of the prompts of prompts.jsonl"):
        build_reward(f"{reward_file}:has_answer", "k", columns())(["Something else"], ["4"])


def test_duplicate_prompt_with_different_columns_names_both_rows():
    with pytest.raises(ValueError, match=r"prompts.jsonl rows 1 and 3 have the same prompt 'Q' with different"):
        PromptColumns.build([["Q"], ["R"], ["Q"]], ["Q", "R", "Q"], [{"a": 1}, {"a": 2}, {"a": 3}], [1, 2, 3],
                            "prompts.jsonl")


def test_checked_accepts_tensors_and_tuples():
    assert checked("f", torch.tensor([1, 2]), ["a", "b"]).tolist() == [1.0, 2.0]
    assert checked("f", (0.5, -1), ["a", "b"]).tolist() == [0.5, -1.0]
    with pytest.raises(ValueError, match="returned int, not a sequence"):
        checked("f", 3, ["a"])


# ------------------------------------------------------------------------------------------ through the config
def _real(tmp_path, *extra):
    files = {}
    for key in ("sft", "preferences", "prompts", "eval_prompts"):
        path = tmp_path / f"{key}.jsonl"
        path.write_text(json.dumps({"prompt": "Q", "completion": "A", "chosen": "A", "rejected": "B"}) + "\n")
        files[key] = path
    return compose_run_config(["model=llama", f"model.path={tmp_path}", "data=files",
                               *[f"data.{k}={v}" for k, v in files.items()], *extra])


def test_config_accepts_callables_and_sums(tmp_path, reward_file):
    cfg = _real(tmp_path, "pipeline=grpo", f"trainer.grpo.reward={reward_file}:has_answer",
                f"eval.reward=[{{name:'{reward_file}:words',weight:0.5}},{{name:length,target:10}}]")
    assert cfg.trainer["grpo"].extras.reward == f"{reward_file}:has_answer"
    assert cfg.eval_reward == [{"name": f"{reward_file}:words", "weight": 0.5}, {"name": "length", "target": 10}]


@pytest.mark.parametrize(("override", "message"), [
    ("trainer.grpo.reward={file}:missing", r"trainer.grpo.reward=.*has no attribute 'missing'"),
    ("trainer.grpo.reward=ground_truth", r"trainer.grpo.reward='ground_truth': expected a reward for real data"),
    ("trainer.grpo.reward=[{{name:length}},{{name:ground_truth}}]", r"expected a reward for real data"),
    ("eval.reward={{name:regex,pattern:x,flags:2}}", r"eval.reward.flags: regex has no parameter 'flags'"),
])
def test_config_refuses_bad_rewards_at_start_up(tmp_path, reward_file, override, message):
    with pytest.raises(ConfigError, match=message):
        _real(tmp_path, "pipeline=grpo", "trainer.grpo.reward=length", override.format(file=reward_file))


def test_eval_without_reward_model_is_none_on_real_data(tmp_path):
    assert _real(tmp_path, "trainer.dpo.pairs=dataset").eval_reward == "none"
    assert _real(tmp_path, "pipeline=ppo").eval_reward == "model"


def test_classifier_reward_equals_the_models_own_logits(tmp_path):
    """A tiny randomly initialised LlamaForSequenceClassification with a local tokenizer, saved as a directory:
    the reward is its label-1 logit at the last token of 'prompt\\nresponse'."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from align.data.synthetic.tokenizer import build_tokenizer

    tok = build_tokenizer()
    tok.chat_template = None
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=2, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config).eval()
    model.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    reward = build_reward({"name": "classifier", "path": str(tmp_path / "rm"), "label": 1, "batch_size": 1}, "k")
    responses = ["the acting was good .", "bad ."]
    out = reward(["the film", "the plot"], responses)
    with torch.no_grad():
        expected = [model(**tok(f"{p}\n{r}", return_tensors="pt")).logits[0, 1].item()
                    for p, r in zip(["the film", "the plot"], responses)]
    torch.testing.assert_close(out, torch.tensor(expected), rtol=0, atol=1e-5)
    assert not math.isnan(out.sum().item())
    with pytest.raises(ValueError, match=r"path='/nowhere': not a local transformers model directory"):
        check_reward_spec({"name": "classifier", "path": "/nowhere"}, "k")
