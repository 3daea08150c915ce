"""Resuming a DeepSpeed checkpoint never unpickles code: every file DeepSpeed reads back goes through
``torch.load(weights_only=True)`` with only DeepSpeed's own plain state classes allowed, so a checkpoint directory on
shared storage that someone replaced with a malicious pickle is refused with a clear error instead of running it."""

from __future__ import annotations

import builtins
from pathlib import Path

import pytest
import torch

from align.distributed.ds_config import resolve_ds_config

from .test_deepspeed import ACCUM, CONFIGS, MICRO_BATCH, STEPS
from .tiny_dpo import OPTIM, dpo_trainer, loop_config, run, tiny_model


class CreatesMarker:
    """Unpickling this calls ``open(marker, "w")``: the file appears only if the pickle was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


def checkpoint_of_two_steps(config: str, out: Path) -> Path:
    torch.manual_seed(0)
    trainer = dpo_trainer(tiny_model(), loop_config(STEPS, MICRO_BATCH, ACCUM, str(CONFIGS / config)), out)
    run(trainer, stop_at=2)
    return trainer.save()


@pytest.mark.parametrize(("config", "victim"), [
    ("zero2.json", "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
    ("zero2.json", "mp_rank_00_model_states.pt"),
    ("zero3.json", "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
])
def test_a_malicious_pickle_in_the_checkpoint_is_refused_not_run(config, victim, tmp_path, single_rank):
    checkpoint = checkpoint_of_two_steps(config, tmp_path / "run")
    target = checkpoint / "deepspeed" / "engine" / victim
    assert target.is_file()
    probe = tmp_path / "probe-marker"  # the payload works: a plain torch.load runs it
    torch.save({"optimizer_state_dict": CreatesMarker(probe)}, tmp_path / "probe.pt")
    torch.load(tmp_path / "probe.pt", weights_only=False)
    assert probe.exists()

    marker = tmp_path / "pwned"
    torch.save({"optimizer_state_dict": CreatesMarker(marker), "module": CreatesMarker(marker)}, target)
    resumed = dpo_trainer(tiny_model(), loop_config(STEPS, MICRO_BATCH, ACCUM, str(CONFIGS / config)),
                          tmp_path / "run")
    with pytest.raises(RuntimeError, match=rf"{victim}.*refusing to unpickle it") as caught:
        resumed.resume()
    assert not marker.exists()
    assert "a reference to io.open" in str(caught.value)  # names what it refused (builtins.open is io.open)


def test_an_unmodified_checkpoint_loads_without_unrestricted_pickle(tmp_path, single_rank, monkeypatch):
    """Every ``torch.load`` on the resume path asks for ``weights_only=True`` (DeepSpeed's own engine asks for
    False), and the resumed run carries on where it stopped."""
    checkpoint_of_two_steps("zero2.json", tmp_path / "run")
    calls: list[tuple[str, object]] = []
    real_load = torch.load

    def recording_load(f, *args, **kwargs):
        calls.append((str(f), kwargs.get("weights_only")))
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    resumed = dpo_trainer(tiny_model(), loop_config(STEPS, MICRO_BATCH, ACCUM, str(CONFIGS / "zero2.json")),
                          tmp_path / "run")
    assert resumed.resume() and resumed.step == 2
    loaded = [Path(name).name for name, _ in calls]
    assert {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"} <= set(loaded)
    assert all(weights_only is True for _, weights_only in calls), calls


def test_universal_checkpoint_loading_is_refused():
    """DeepSpeed's universal-checkpoint loader reads its files with ``torch.load(weights_only=False)`` itself."""
    from align.config.trainer import LoopConfig

    with pytest.raises(ValueError, match="checkpoint.load_universal"):
        resolve_ds_config({"checkpoint": {"load_universal": True}}, OPTIM, LoopConfig(), world_size=1)
