"""Format detection from column names, and normalisation of each layout to prompt + responses."""

import pytest

from align.data import DataError, Example, RowProblem, detect_format
from align.data.formats import normalise_row
from align.data.rows import NO_SHARED_PROMPT, NOT_ASSISTANT


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


@pytest.mark.parametrize("columns, use, layout", [
    (["prompt", "chosen", "rejected"], None, "preference"),
    (["chosen", "rejected"], None, "preference_implicit"),  # HH transcripts or message lists
    (["prompt", "chosen", "rejected", "messages", "score_chosen"], None, "preference"),  # UltraFeedback
    (["messages"], None, "messages"),
    (["prompt", "completion"], None, "prompt_completion"),
    (["text"], None, "text"),
    (["prompt"], None, "prompt"),
    (["messages"], "prompt", "prompt_messages"),
    (["prompt", "chosen", "rejected"], "sft", "preference"),  # SFT on the preferred responses
    (["prompt", "completion"], "prompt", "prompt_completion"),
])
def test_detect_each_layout(columns, use, layout):
    assert detect_format(columns, use=use) == layout


def test_detect_names_what_is_missing():
    with pytest.raises(DataError, match=r"^x.jsonl: cannot tell the data format from the columns \['chosen', 'question'\]"):
        detect_format(["question", "chosen"], source="x.jsonl")
    with pytest.raises(DataError, match=r"it has only prompts: use it for PPO/GRPO, or add 'chosen' and 'rejected'"):
        detect_format(["prompt"], use="preference")
    with pytest.raises(DataError, match=r"plain 'text' rows have no prompt"):
        detect_format(["text"], use="prompt")
    with pytest.raises(DataError, match=r"or set data.format=auto"):
        detect_format(["prompt", "completion"], fmt="preference")
    assert detect_format(["prompt", "completion", "chosen", "rejected"], fmt="sft") == "prompt_completion"


def test_hh_transcripts_split_at_the_last_shared_assistant_turn():
    history = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke."
    row = {"chosen": history + "\n\nAssistant: Sure thing: a chicken crossed the road.",
           "rejected": history + "\n\nAssistant: Sure, no."}
    example = normalise_row(row, 4, "preference_implicit", "preference")
    # The common prefix runs into " Sure", but the prompt ends at the last "\n\nAssistant:".
    assert example == Example(4, history + "\n\nAssistant:", chosen=" Sure thing: a chicken crossed the road.",
                              rejected=" Sure, no.", raw=True)  # already formatted: never templated


def test_hh_without_a_shared_assistant_turn_is_a_row_problem():
    problem = normalise_row({"chosen": "Hi there", "rejected": "Hi you"}, 2, "preference_implicit", "preference")
    assert isinstance(problem, RowProblem)
    assert (problem.row, problem.field, problem.reason) == (2, "chosen", NO_SHARED_PROMPT)


def test_ultrafeedback_conversations_share_a_prompt_prefix():
    shared = [user("Hi"), bot("Hello!"), user("Tell me a joke.")]
    row = {"prompt": "Hi", "chosen": shared + [bot("A chicken crossed the road.")], "rejected": shared + [bot("No.")]}
    example = normalise_row(row, 1, "preference", "preference")
    assert example.prompt == tuple(shared)  # the string 'prompt' column is not used: the messages are
    assert example.chosen == (bot("A chicken crossed the road."),)
    assert example.rejected == (bot("No."),)


def test_string_prompt_with_assistant_only_conversations():
    row = {"prompt": "Hi", "chosen": [bot("Hello!")], "rejected": [bot("Go away.")]}
    example = normalise_row(row, 1, "preference", "preference")
    assert example == Example(1, (user("Hi"),), chosen=(bot("Hello!"),), rejected=(bot("Go away."),))


def test_conversations_with_different_first_turns_have_no_prompt():
    row = {"chosen": [user("A"), bot("x")], "rejected": [user("B"), bot("y")]}
    problem = normalise_row(row, 3, "preference_implicit", "preference")
    assert (problem.row, problem.reason) == (3, NO_SHARED_PROMPT)


def test_explicit_conversational_prompt_wraps_string_responses():
    row = {"prompt": [user("Hi")], "chosen": "Hello!", "rejected": [bot("Go away.")]}
    example = normalise_row(row, 1, "preference", "preference")
    assert example == Example(1, (user("Hi"),), chosen=(bot("Hello!"),), rejected=(bot("Go away."),))


def test_messages_sft_trains_on_the_last_assistant_turn():
    row = {"messages": [user("Hi"), bot("Hello!"), user("Joke?"), bot("No.")]}
    example = normalise_row(row, 1, "messages", "sft")
    assert example.prompt == (user("Hi"), bot("Hello!"), user("Joke?"))
    assert example.completion == (bot("No."),)
    problem = normalise_row({"messages": [user("Hi")]}, 5, "messages", "sft")
    assert (problem.row, problem.field, problem.reason) == (5, "messages", NOT_ASSISTANT)


def test_text_prompt_completion_and_prompts():
    assert normalise_row({"text": "Once upon a time"}, 1, "text", "sft") == Example(1, "", completion="Once upon a time", raw=True)
    assert normalise_row({"prompt": "Q", "completion": " A"}, 2, "prompt_completion", "sft") == Example(2, "Q", completion=" A")
    finished = {"messages": [user("Hi"), bot("Hello!")]}
    assert normalise_row(finished, 3, "prompt_messages", "prompt") == Example(3, (user("Hi"),))


def test_a_preference_file_serves_sft_and_prompts():
    row = {"prompt": "Q", "chosen": " good", "rejected": " bad"}
    assert normalise_row(row, 1, "preference", "sft") == Example(1, "Q", completion=" good")
    assert normalise_row(row, 1, "preference", "prompt") == Example(1, "Q")
