"""The trainers use align.data's collators only; loading data (``datasets``, with pandas and pyarrow: about 85 MiB
resident) is imported on first use, so a training process handed its rows never pays for it."""

import subprocess
import sys

import pytest

import align.data


def test_trainers_do_not_import_datasets():
    code = ("import sys; import align.trainers.ppo, align.trainers.dpo, align.trainers.sft, "
            "align.trainers.reward_model, align.trainers.grpo; "
            "print(sorted(m for m in ('datasets', 'pandas', 'pyarrow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_lazy_names_resolve_and_unknown_names_fail():
    from align.data.sources import load_source

    assert align.data.load_source is load_source
    assert set(align.data.__all__) <= set(dir(align.data)) | set(align.data._LAZY)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        align.data.nope  # noqa: B018
