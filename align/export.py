"""``python -m align.export run.dir=<run> [stage=<stage>] [format=merged|adapter] [out=<dir>] [dtype=fp32|bf16]``

Export what a finished stage of a run trained (see ``python -m align.run``):

    format=merged   (default) the base with the stage's adapter folded into its weights, written as an ordinary
                    transformers model directory with the base's tokenizer: AutoModelForCausalLM.from_pretrained(out)
                    loads it. dtype=fp32 (default) or bf16 (merged in fp32, then cast). Default out:
                    <run>/export/<stage>-merged. Needs a policy stage (not rm) whose adapter can be merged.
    format=adapter  a copy of the stage's PEFT-format adapter directory (adapter_config.json,
                    adapter_model.safetensors, align_base.json; rm's score head too), loadable with
                    PeftModel.from_pretrained(base, out) on the run's base. Default out: <run>/export/<stage>-adapter.

stage defaults to the run's policy stage: the first of dpo, ppo, grpo, rloo, sft that finished. The output is
written beside its target and moved into place at the end; an earlier export at ``out`` is replaced, any other
existing non-empty directory is refused. The output path is printed (alone, on stdout) at the end; notes go to
stderr. Usage and config errors exit with status 2.

    python -m align.export run.dir=runs/dpo
    python -m align.export run.dir=runs/dpo stage=sft format=adapter out=/tmp/sft-adapter
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align.config.build import suggest
from align.durable import replace_dir_durable

USAGE = __doc__

#: stages that save an adapter, and the order in which a policy stage is picked when none is named
ADAPTER_STAGES = ("sft", "rm", "dpo", "ppo", "grpo", "rloo")
POLICY_STAGES = ("dpo", "ppo", "grpo", "rloo", "sft")
EXPORT_MARKER = "align_export.json"  # written into every export; only a directory holding it is ever replaced


class UsageError(Exception):
    """A bad command line or a run that cannot serve the request: printed to stderr, exit status 2."""


# ------------------------------------------------------------------------------------------ key=value parsing
@dataclass(frozen=True)
class Option:
    """One ``key=value`` argument: its type (str, int, float), default, allowed values and an extra check
    (a predicate and the words that describe what it accepts)."""

    kind: type = str
    default: Any = None
    choices: tuple | None = None
    required: bool = False
    check: tuple[Callable[[Any], bool], str] | None = None
    help: str = ""


def _suggest(word: str, candidates: Sequence[str]) -> str:
    return suggest(word, candidates, cutoff=0.5)


def _convert(key: str, raw: str, option: Option) -> Any:
    try:
        value = option.kind(raw)
    except ValueError:
        what = {int: "an integer", float: "a number"}.get(option.kind, option.kind.__name__)
        raise UsageError(f"{key}={raw!r}: expected {what}") from None
    if option.choices is not None and value not in option.choices:
        raise UsageError(f"{key}={raw!r}: expected one of {', '.join(map(str, option.choices))}"
                         f"{_suggest(str(value), [str(c) for c in option.choices])}")
    if option.check is not None and not option.check[0](value):
        raise UsageError(f"{key}={raw!r}: expected {option.check[1]}")
    return value


def parse_options(argv: Sequence[str], options: dict[str, Option]) -> dict[str, Any]:
    """``key=value`` arguments -> {key: typed value} for every key of ``options`` (defaults filled in). Unknown,
    repeated, malformed or missing keys raise ``UsageError`` naming the key (and the closest valid one)."""
    given: dict[str, Any] = {}
    valid = ", ".join(options)
    for arg in argv:
        if "=" not in arg:
            raise UsageError(f"argument {arg!r}: expected key=value (keys: {valid})")
        key, raw = arg.split("=", 1)
        if key.startswith("-"):
            bare = key.lstrip("-")
            hint = f"; write {bare}={raw}" if bare in options else ""
            raise UsageError(f"argument {arg!r}: options are key=value without dashes{hint} (keys: {valid})")
        if key not in options:
            raise UsageError(f"unknown key {key!r}{_suggest(key, list(options))} (keys: {valid})")
        if key in given:
            raise UsageError(f"{key} is given twice")
        given[key] = _convert(key, raw, options[key])
    for key, option in options.items():
        if key not in given:
            if option.required:
                raise UsageError(f"missing {key}=... ({option.help})" if option.help else f"missing {key}=...")
            given[key] = option.default
    return given


def is_load_error(exc: BaseException) -> bool:
    """An adapter that does not fit its base, or a file that cannot be read or written: reported without a
    traceback (exit status 1)."""
    from align.adapters import AdapterError

    return isinstance(exc, (AdapterError, OSError))


def report_error(exc: Exception) -> int:
    """Print a usage or load error without a traceback and return the exit status (2 or 1); re-raise the rest."""
    if not isinstance(exc, UsageError) and not is_load_error(exc):
        raise exc
    print(f"error: {exc}", file=sys.stderr)
    return 2 if isinstance(exc, UsageError) else 1


def wants_help(argv: Sequence[str]) -> bool:
    return any(arg in ("-h", "--help", "help") for arg in argv)


# -------------------------------------------------------------------------------------------- run resolution
@dataclass(frozen=True)
class StageSource:
    """What a command reads from a run: the base model directory and the chosen stage's adapter directory."""

    run_dir: Path
    stage: str
    model_dir: Path
    adapter_dir: Path


def _finished(stages: dict[str, dict], among: Sequence[str]) -> list[str]:
    return [s for s in among if stages.get(s, {}).get("status") == "done"]


def resolve_stage(run_dir: str | Path, stage: str | None, policy_only: bool, purpose: str) -> StageSource:
    """Check that ``run_dir`` is a run and ``stage`` (default: its policy stage) finished there; return where the
    base and the stage's adapter live. ``policy_only`` refuses ``rm`` (a score head, not a language model)."""
    from pipelines.manifest import MANIFEST, Manifest, base_dirs, stage_adapter

    run_dir = Path(run_dir).expanduser()
    if not (run_dir / MANIFEST).is_file():
        what = "does not exist" if not run_dir.exists() else f"has no {MANIFEST}"
        raise UsageError(f"not a run directory: {run_dir} {what}; run `python -m align.run run.dir={run_dir}` "
                         "first, or point run.dir at the directory it wrote")
    try:
        stages = Manifest.load(run_dir).stages
    except RuntimeError as exc:  # an unreadable manifest
        raise UsageError(str(exc)) from None
    usable = POLICY_STAGES if policy_only else ADAPTER_STAGES
    finished = _finished(stages, usable)
    listing = ", ".join(finished) if finished else "none"
    if stage is None:  # the policy stage, whatever the purpose (rm only when named)
        policies = _finished(stages, POLICY_STAGES)
        if not policies:
            raise UsageError(f"run {run_dir} has no finished policy stage ({', '.join(POLICY_STAGES)}) to {purpose}; "
                             f"finished stages: {', '.join(_finished(stages, list(stages))) or 'none'}"
                             + ("" if policy_only or "rm" not in finished else "; pass stage=rm for the reward model"))
        stage = policies[0]
    elif stage == "rm" and policy_only:
        raise UsageError(f"stage=rm is the reward model (an adapter with a score head), not a language-model policy, "
                         f"so it cannot {purpose}; policy stages finished in {run_dir}: {listing}"
                         + ("; export the reward adapter with format=adapter" if purpose.startswith("export") else ""))
    elif stage not in ADAPTER_STAGES:
        raise UsageError(f"stage={stage!r}: expected one of {', '.join(usable)}{_suggest(stage, usable)} "
                         f"(finished in {run_dir}: {listing})")
    elif stage not in finished:
        status = stages.get(stage, {}).get("status", "never run")
        raise UsageError(f"stage={stage}: not finished in {run_dir} (status: {status}); finished stages: {listing}")
    try:
        model_dir, _ = base_dirs(run_dir)
        adapter_dir = stage_adapter(run_dir, stage)
    except (FileNotFoundError, KeyError) as exc:
        raise UsageError(f"run {run_dir}: {exc}") from None
    if not (model_dir / "config.json").is_file():
        raise UsageError(f"run {run_dir}: its base model directory {model_dir} is missing (no config.json)")
    if not (adapter_dir / "adapter_config.json").is_file():
        raise UsageError(f"run {run_dir}: stage {stage} is recorded as done but its adapter {adapter_dir} is missing; "
                         f"rerun `python -m align.run run.dir={run_dir} ...` to rebuild it")
    return StageSource(run_dir, stage, model_dir, adapter_dir)


# ------------------------------------------------------------------------------------------- atomic output
def check_replaceable(out: Path) -> None:
    """``out`` may be written: absent, an empty directory, or an earlier export (it holds ``EXPORT_MARKER``)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UsageError(f"out={out} exists and is not a directory")
    if any(out.iterdir()) and not (out / EXPORT_MARKER).is_file():
        raise UsageError(f"out={out} exists and is not an earlier export (no {EXPORT_MARKER}); remove it or choose "
                         "another out=")


def write_dir_atomic(out: Path, fill: Callable[[Path], None]) -> Path:
    """Let ``fill`` write a temporary directory beside ``out``, then move it into place (replacing an earlier
    export). A failure leaves ``out`` as it was."""
    check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        fill(tmp)
        replace_dir_durable(tmp, out)  # flushed, then swapped in: readers see the old export or the new one
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_marker(directory: Path, source: StageSource, fmt: str, **extra: Any) -> None:
    record = {"run_dir": str(source.run_dir.resolve()), "stage": source.stage, "format": fmt,
              "base_model_dir": str(source.model_dir), "adapter_dir": str(source.adapter_dir.resolve()), **extra}
    (directory / EXPORT_MARKER).write_text(json.dumps(record, indent=2))


# --------------------------------------------------------------------------------------------------- export
def export_merged(source: StageSource, out: Path, dtype: str) -> Path:
    import torch
    from transformers import AutoTokenizer

    from align.adapters import AdapterError, AdapterModel
    from align.models.loading import load_base

    base, _ = load_base(source.model_dir, quantization="none", dtype=torch.float32)  # merge in full precision
    model = AdapterModel(base)
    model.load_adapter(source.adapter_dir, source.stage)
    try:
        merged = model.merge_and_unload(source.stage)
    except AdapterError as exc:
        raise UsageError(f"{exc}; export it with format=adapter instead") from None
    if dtype == "bf16":
        merged = merged.to(torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(str(source.model_dir))  # the base's tokenizer, unchanged

    def fill(tmp: Path) -> None:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _write_marker(tmp, source, "merged", dtype=dtype)

    return write_dir_atomic(out, fill)


def export_adapter(source: StageSource, out: Path) -> tuple[Path, str]:
    """Copy the adapter directory (with any head files); returns the path and the adapter's peft_type."""
    from align.adapters import read_adapter_config

    def fill(tmp: Path) -> None:
        shutil.copytree(source.adapter_dir, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".*"))
        read_adapter_config(tmp)  # what was copied is a readable adapter
        _write_marker(tmp, source, "adapter")

    write_dir_atomic(out, fill)
    return out, type(read_adapter_config(out)).peft_type


def loading_notes(source: StageSource, out: Path, peft_type: str) -> list[str]:
    lines = [f"exported the {source.stage} adapter ({peft_type}) of {source.run_dir}; its base model is "
             f"{source.model_dir}"]
    if peft_type.startswith("ALIGN_"):
        lines += ["PEFT has no such method; load it with align:",
                  f"    AdapterModel(base).load_adapter({str(out)!r}, {source.stage!r})"]
    else:
        lines += ["load it with PEFT:",
                  "    from peft import PeftModel",
                  "    from transformers import AutoModelForCausalLM",
                  f"    base = AutoModelForCausalLM.from_pretrained({str(source.model_dir)!r})",
                  f"    model = PeftModel.from_pretrained(base, {str(out)!r})",
                  f"or with align: AdapterModel(base).load_adapter({str(out)!r}, {source.stage!r})"]
    if (out / "head.json").is_file():
        lines.append(f"its score head (head.safetensors, head.json) is align's: "
                     f"align.models.heads.ScalarHead.load({str(out)!r})")
    return lines


OPTIONS = {
    "run.dir": Option(required=True, help="the run directory `python -m align.run` wrote, e.g. run.dir=runs/dpo"),
    "stage": Option(help="the stage whose adapter to export; default: the run's policy stage"),
    "format": Option(default="merged", choices=("merged", "adapter")),
    "out": Option(help="output directory; default <run>/export/<stage>-<format>"),
    "dtype": Option(default=None, choices=("fp32", "bf16")),
}


def main(argv: list[str] | None = None) -> int:
    from align.offline import default_offline

    default_offline()  # before the Hugging Face libraries are imported: nothing from the network by surprise
    argv = sys.argv[1:] if argv is None else argv
    if wants_help(argv):
        print(USAGE)
        return 0
    try:
        opts = parse_options(argv, OPTIONS)
        fmt = opts["format"]
        if fmt == "adapter" and opts["dtype"] is not None:
            raise UsageError("dtype applies to format=merged only (an adapter is copied as trained)")
        source = resolve_stage(opts["run.dir"], opts["stage"], policy_only=fmt == "merged",
                               purpose="export a merged model" if fmt == "merged" else "export")
        out = Path(opts["out"]).expanduser() if opts["out"] else source.run_dir / "export" / f"{source.stage}-{fmt}"
        check_replaceable(out)  # before the expensive part
        if fmt == "merged":
            print(f"merging the {source.stage} adapter into {source.model_dir} ...", file=sys.stderr)
            export_merged(source, out, opts["dtype"] or "fp32")
            print(f"load it with transformers: AutoModelForCausalLM.from_pretrained({str(out)!r})", file=sys.stderr)
        else:
            out, peft_type = export_adapter(source, out)
            print("\n".join(loading_notes(source, out, peft_type)), file=sys.stderr)
    except Exception as exc:
        return report_error(exc)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
