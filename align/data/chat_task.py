"""A small conversational task with checkable answers, written as ordinary local files for real chat models.

Questions are one-step arithmetic ("What is 17 + 25?"); the reference answer is kept in an ``answer`` column, so a
verifiable reward (exact match, or a user function reading the column) can score any response. The files are the
shapes users bring, in the conversational layouts of ``docs/data.md``:

    sft.jsonl               {"messages": [{"role": "user", ...}, {"role": "assistant", ...}], "answer"}
    preferences.jsonl       {"prompt": [user msg], "chosen": [assistant msg], "rejected": [assistant msg]}
    preferences_eval.jsonl  held-out pairs, same layout
    prompts.jsonl           {"prompt": [user msg], "answer"}   (RL and on-policy pair prompts)
    eval_prompts.jsonl      held-out prompts, same layout

Used by the real-model tests, docs and benchmarks (``python -m align.data.chat_task <dir>`` writes them).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
STYLES = ("The answer is {c}.", "{a} {op} {b} = {c}.", "{c}")


def _question(rng: random.Random) -> tuple[str, int, tuple]:
    op = rng.choice(tuple(OPS))
    a, b = (rng.randint(2, 12), rng.randint(2, 12)) if op == "*" else (rng.randint(2, 60), rng.randint(2, 40))
    return f"What is {a} {op} {b}? Reply with the number.", OPS[op](a, b), (a, op, b)


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def make_rows(n: int, seed: int) -> list[dict]:
    """``n`` distinct questions with a correct and a wrong answer each."""
    rng, seen, rows = random.Random(seed), set(), []
    while len(rows) < n:
        question, answer, (a, op, b) = _question(rng)
        if question in seen:
            continue
        seen.add(question)
        wrong = answer + rng.choice((-10, -2, -1, 1, 2, 10))
        style = rng.choice(STYLES)
        rows.append({"question": question, "answer": str(answer),
                     "good": style.format(a=a, op=op, b=b, c=answer), "bad": style.format(a=a, op=op, b=b, c=wrong)})
    return rows


def write_chat_task(out: str | Path, train: int = 400, held_out: int = 64, seed: int = 0) -> dict[str, str]:
    """Write the five files into ``out``; returns {data key: path} for ``data=files`` overrides."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = make_rows(train + held_out, seed)
    tr, ev = rows[:train], rows[train:]
    files = {
        "sft": [{"messages": _user(r["question"]) + _assistant(r["good"]), "answer": r["answer"]} for r in tr],
        "preferences": [{"prompt": _user(r["question"]), "chosen": _assistant(r["good"]),
                         "rejected": _assistant(r["bad"])} for r in tr],
        "preferences_eval": [{"prompt": _user(r["question"]), "chosen": _assistant(r["good"]),
                              "rejected": _assistant(r["bad"])} for r in ev],
        "prompts": [{"prompt": _user(r["question"]), "answer": r["answer"]} for r in tr],
        "eval_prompts": [{"prompt": _user(r["question"]), "answer": r["answer"]} for r in ev],
    }
    paths = {}
    for key, data in files.items():
        path = out / f"{key}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in data))
        paths[key] = str(path)
    return paths


if __name__ == "__main__":
    for key, path in write_chat_task(sys.argv[1] if len(sys.argv) > 1 else "chat_task").items():
        print(f"data.{key}={path}")
