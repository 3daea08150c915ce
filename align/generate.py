"""``python -m align.generate run.dir=<run> prompt="..." [stage=<stage>] [key=value ...]``: sample from a run.

Loads the run's base with a finished stage's adapter (default: the run's policy stage, the first of dpo, ppo, grpo,
rloo, sft that finished; ``rm`` is a reward model and is refused) and samples responses on the CPU, the prompt
going through the tokenizer's chat template when it has one.

    prompt="..."              one prompt; its responses are printed as plain text (with num_samples > 1, each after
                              a ``--- sample i ---`` line)
    prompts_file=<jsonl>      one prompt per line in a "prompt" field; one JSON line per response is printed:
                              {"prompt": ..., "sample": i, "response": ...}
    max_new_tokens=64  temperature=1.0 (0: greedy)  top_p=1.0  num_samples=1  seed=0

The same seed gives the same responses. Usage and config errors exit with status 2.

    python -m align.generate run.dir=runs/dpo prompt="review: the soup was cold"
    python -m align.generate run.dir=runs/dpo stage=sft prompts_file=prompts.jsonl num_samples=4 temperature=0.7
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from align.export import Option, UsageError, parse_options, report_error, resolve_stage, wants_help

USAGE = __doc__

OPTIONS = {
    "run.dir": Option(required=True, help="the run directory `python -m align.run` wrote, e.g. run.dir=runs/dpo"),
    "stage": Option(help="the stage whose adapter generates; default: the run's policy stage"),
    "prompt": Option(),
    "prompts_file": Option(),
    "max_new_tokens": Option(int, 64, check=(lambda v: v > 0, "a positive integer")),
    "temperature": Option(float, 1.0, check=(lambda v: v >= 0, "a number >= 0 (0: greedy)")),
    "top_p": Option(float, 1.0, check=(lambda v: 0 < v <= 1, "a number in (0, 1]")),
    "num_samples": Option(int, 1, check=(lambda v: v > 0, "a positive integer")),
    "seed": Option(int, 0),
}


def read_prompts(path: str | Path) -> list[str]:
    """The "prompt" field of every non-blank line of a JSONL file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UsageError(f"prompts_file={path}: no such file")
    prompts = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UsageError(f"prompts_file={path}, line {number}: not valid JSON ({exc})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise UsageError(f"prompts_file={path}, line {number}: expected an object with a string "
                                 "\"prompt\" field")
            if not row["prompt"].strip():
                raise UsageError(f"prompts_file={path}, line {number}: the \"prompt\" is empty; write the prompt "
                                 "or remove the line")
            prompts.append(row["prompt"])
    if not prompts:
        raise UsageError(f"prompts_file={path}: no prompts in it")
    return prompts


def check_adapter_files(source) -> None:
    """The stage's adapter weights and base fingerprint can be read: a file cut short or garbled (a full disk, an
    interrupted copy) is named with what to do, instead of a traceback from deep inside the loader."""
    from safetensors import SafetensorError, safe_open

    from align.adapters import AdapterError

    fix = (f"the file is damaged (cut short?); rerun `python -m align.run run.dir={source.run_dir} ...` to rebuild "
           f"the {source.stage} stage, or restore the file from a copy")
    weights = source.adapter_dir / "adapter_model.safetensors"
    if weights.is_file():
        try:
            with safe_open(str(weights), framework="pt") as handle:
                handle.keys()
        except SafetensorError as exc:
            raise AdapterError(f"{weights} cannot be read as safetensors ({exc}): {fix}") from None
    fingerprint = source.adapter_dir / "align_base.json"
    if fingerprint.is_file():
        try:
            saved = json.loads(fingerprint.read_bytes())
        except ValueError as exc:  # invalid JSON or UTF-8
            raise AdapterError(f"{fingerprint} is not valid JSON ({exc}): {fix}") from None
        if not isinstance(saved, dict):
            raise AdapterError(f"{fingerprint} holds a {type(saved).__name__}, not the base's fingerprint (a JSON "
                               f"object): {fix}")


def generate(source, prompts: list[str], opts: dict) -> list[list[str]]:
    """``num_samples`` responses per prompt: [prompt][sample]."""
    from align.adapters import AdapterModel
    from align.models.generate import sample
    from align.models.loading import load_base

    base, tokenizer = load_base(source.model_dir)
    model = AdapterModel(base)
    model.load_adapter(source.adapter_dir, source.stage)
    n = opts["num_samples"]
    flat = sample(model, source.stage, tokenizer, [p for p in prompts for _ in range(n)],
                  max_new_tokens=opts["max_new_tokens"], temperature=opts["temperature"], top_p=opts["top_p"],
                  seed=opts["seed"])
    return [flat[i * n:(i + 1) * n] for i in range(len(prompts))]


def main(argv: list[str] | None = None) -> int:
    from align.offline import default_offline

    default_offline()  # before the Hugging Face libraries are imported: nothing from the network by surprise
    argv = sys.argv[1:] if argv is None else argv
    if wants_help(argv):
        print(USAGE)
        return 0
    try:
        opts = parse_options(argv, OPTIONS)
        if (opts["prompt"] is None) == (opts["prompts_file"] is None):
            raise UsageError("give exactly one of prompt=\"...\" or prompts_file=<jsonl with a \"prompt\" field>")
        if opts["prompt"] is not None and not opts["prompt"].strip():
            raise UsageError("prompt=\"\": the prompt is empty; give the text to respond to")
        prompts = [opts["prompt"]] if opts["prompt"] is not None else read_prompts(opts["prompts_file"])
        source = resolve_stage(opts["run.dir"], opts["stage"], policy_only=True, purpose="generate text")
        check_adapter_files(source)
        print(f"sampling from the {source.stage} adapter of {source.run_dir} ...", file=sys.stderr)
        responses = generate(source, prompts, opts)
    except Exception as exc:
        return report_error(exc)
    if opts["prompts_file"] is None:
        for i, response in enumerate(responses[0]):
            if len(responses[0]) > 1:
                print(f"--- sample {i} ---")
            print(response)
    else:
        for prompt, samples in zip(prompts, responses):
            for i, response in enumerate(samples):
                print(json.dumps({"prompt": prompt, "sample": i, "response": response}, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
