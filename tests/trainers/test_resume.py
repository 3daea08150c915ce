"""Checkpoints hold everything an exact resume needs, and are written atomically.

Resume identity: 10 steps straight == 5 steps, a kill, a NEW trainer on freshly built model objects resuming
for 5 more: bit-identical trainable weights and optimizer state, the same batches after the resume point. LoRA
dropout is on, so the torch RNG state must be restored too (a control run without it diverges)."""

import pytest
import torch
from safetensors.torch import load_file

import align.trainers.backend as backend_module
import align.trainers.checkpoint as checkpoint_module
from align.trainers.checkpoint import latest_checkpoint

from .helpers import assert_equal_tensors, build_trainer, max_difference, snapshot


class Killed(Exception):
    """Stands in for SIGKILL in the middle of a step."""


def record_batches(trainer, kill_at_step: int | None = None) -> list[tuple[int, torch.Tensor]]:
    """Wrap the trainer's loss: record (step being taken, input_ids), die at the start of ``kill_at_step``."""
    seen: list[tuple[int, torch.Tensor]] = []
    loss_fn = trainer.loss_fn

    def recording(batch):
        if trainer.step + 1 == kill_at_step:
            raise Killed
        seen.append((trainer.step + 1, batch["input_ids"].clone()))
        return loss_fn(batch)

    trainer.loss_fn = recording
    return seen


def optimizer_state(trainer) -> dict[str, torch.Tensor]:
    state = trainer.backend.optimizer.state_dict()
    flat = {f"{index}.{key}": value
            for index, entry in state["state"].items() for key, value in entry.items()}
    flat["lr"] = torch.tensor([group["lr"] for group in state["param_groups"]])
    return flat


def run_straight(method, tmp_path):
    torch.manual_seed(0)
    trainer = build_trainer(method, tmp_path / "straight", dropout=0.1, loop={"save_every": 5})
    seen = record_batches(trainer)
    trainer.fit()
    return trainer, seen


def run_killed_then_resumed(method, tmp_path):
    torch.manual_seed(0)
    first = build_trainer(method, tmp_path / "resumed", dropout=0.1, loop={"save_every": 5})
    record_batches(first, kill_at_step=6)
    with pytest.raises(Killed):
        first.fit()
    assert latest_checkpoint(first.checkpoint_dir).name == "step-000005"
    torch.manual_seed(1234)  # a new process: whatever RNG state it happens to have
    second = build_trainer(method, tmp_path / "resumed", dropout=0.1, loop={"save_every": 5})
    seen = record_batches(second)
    second.fit()
    return second, seen


@pytest.mark.parametrize("method", ["sft", "reward", "dpo"])
def test_resume_is_bit_identical(method, tmp_path):
    """grad accum 2, micro-batch 2 over 12 rows: 20 micro-batches, so the data crosses 3 epochs and the
    resume point (micro-batch 10) sits inside the second; cosine schedule with warm-up; weight decay; LoRA
    dropout 0.1."""
    straight, straight_seen = run_straight(method, tmp_path)
    resumed, resumed_seen = run_killed_then_resumed(method, tmp_path)
    assert [s for s, _ in resumed_seen] == [6, 6, 7, 7, 8, 8, 9, 9, 10, 10]  # from step 6, after step 5
    assert len(straight_seen) == 20
    for (_, expected), (_, got) in zip(straight_seen[10:], resumed_seen):  # the data position was restored
        assert torch.equal(expected, got)
    assert resumed.step == straight.step == 10
    assert_equal_tensors(snapshot(resumed.params), snapshot(straight.params))
    assert_equal_tensors(optimizer_state(resumed), optimizer_state(straight))
    assert resumed.backend.scheduler.state_dict() == straight.backend.scheduler.state_dict()
    if method == "reward":
        assert any(name.startswith("head.") for name in resumed.params)  # the head is checkpointed too


def test_resume_without_rng_restore_diverges(tmp_path, monkeypatch):
    """Control for the test above: with dropout on, skipping the RNG restore changes the weights, so the
    identity really depends on it."""
    straight, _ = run_straight("sft", tmp_path)
    monkeypatch.setattr(checkpoint_module, "restore_rng", lambda tensors, python_state: None)
    resumed, _ = run_killed_then_resumed("sft", tmp_path)
    assert max_difference(snapshot(resumed.params), snapshot(straight.params)) > 1e-4


# ------------------------------------------------------------------------------------------------ atomicity
class SimulatedCrash(Exception):
    pass


def crash_on_call(monkeypatch, module, name: str, call: int, partial_write: bool = False) -> None:
    """Make ``module.name`` raise on its ``call``-th call, first writing a truncated file if asked."""
    original = getattr(module, name)
    calls = []

    def crashing(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            if partial_write:
                with open(args[1], "wb") as file:  # save_file(tensors, path) / torch.save(obj, path)
                    file.write(b"\x00partial")
            raise SimulatedCrash(f"{name} call {call}")
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, crashing)


# Each checkpoint calls save_file twice (trainable, then RNG), torch.save once (optimizer) and write_text_durable
# once (the `latest` pointer), so call 3 / 2 / 4 / 2 is the second checkpoint (step 4).
CRASH_POINTS = {
    "trainable": (checkpoint_module, "save_file", 3, True),
    "optimizer": (backend_module.torch, "save", 2, True),
    "rng": (checkpoint_module, "save_file", 4, True),
    "pointer": (checkpoint_module, "write_text_durable", 2, False),  # step dir in place, pointer not updated
}


@pytest.mark.parametrize("where", list(CRASH_POINTS))
def test_crash_while_writing_checkpoint_keeps_previous_one(where, tmp_path, monkeypatch):
    loop = {"max_steps": 6, "save_every": 2, "grad_accum_steps": 1}
    reference = build_trainer("sft", tmp_path / "reference", loop=loop)
    reference.fit()

    trainer = build_trainer("sft", tmp_path / "run", loop=loop)
    with monkeypatch.context() as patch:
        crash_on_call(patch, *CRASH_POINTS[where])
        with pytest.raises(SimulatedCrash):
            trainer.fit()
    root = trainer.checkpoint_dir
    assert trainer.step == 4  # the crash came while saving step 4
    assert latest_checkpoint(root) == root / "step-000002"
    if where != "pointer":
        assert not (root / "step-000004").exists()  # the half-written one lives in a temporary directory only
    assert {p.name for p in root.glob("step-*")} <= {"step-000002", "step-000004"}
    assert set(load_file(str(root / "step-000002" / "trainable.safetensors"))) == set(trainer.params)

    resumed = build_trainer("sft", tmp_path / "run", loop=loop)
    seen = record_batches(resumed)
    resumed.fit()
    assert seen[0][0] == 3  # continued after step 2
    assert latest_checkpoint(root) == root / "step-000006"
    assert_equal_tensors(snapshot(resumed.params), snapshot(reference.params))
