"""Statistics of a batch split over data-parallel ranks: whitening and reward moments with a ``reduce`` (an
all-reduce sum) equal the single-process statistics of the whole batch. The ranks are simulated by threads that
meet at a barrier, each adding its tensor into a shared sum, which is what ``torch.distributed.all_reduce`` does."""

from __future__ import annotations

import threading

import pytest
import torch

from align.algos import RunningMoments, whiten


class ThreadAllReduce:
    """An all-reduce (sum) between ``world`` threads."""

    def __init__(self, world: int) -> None:
        self.world, self.barrier = world, threading.Barrier(world)
        self.lock, self.parts = threading.Lock(), []

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        with self.lock:
            self.parts.append(tensor.clone())
        self.barrier.wait()
        total = torch.stack(self.parts).sum(0)
        if self.barrier.wait() == 0:  # every rank has read the sum: one of them clears it for the next call
            self.parts.clear()
        self.barrier.wait()
        return total


def on_ranks(fn, shards: list) -> list:
    reduce, results = ThreadAllReduce(len(shards)), [None] * len(shards)

    def run(rank):
        results[rank] = fn(shards[rank], reduce)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(len(shards))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(6, 9, generator=gen) * 3 + 1
    mask = torch.rand(6, 9, generator=gen) > 0.3  # ragged responses: ranks hold different token counts
    return values, mask


def test_a_thread_all_reduce_sums():
    assert on_ranks(lambda x, reduce: reduce(x), [torch.tensor([1.0, 2]), torch.tensor([3.0, 5])]) == [
        pytest.approx(torch.tensor([4.0, 7]))] * 2


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whitening_over_two_ranks_equals_the_whole_batch(shift_mean):
    values, mask = batch()
    whole = whiten(values, mask, shift_mean=shift_mean)
    halves = on_ranks(lambda part, reduce: whiten(*part, shift_mean=shift_mean, reduce=reduce),
                      [(values[:2], mask[:2]), (values[2:], mask[2:])])  # 2 rows and 4 rows
    torch.testing.assert_close(torch.cat(halves), whole, rtol=1e-6, atol=1e-6)
    kept = whole[mask]
    assert kept.mean().abs() < 1e-6 if shift_mean else True
    # per-rank statistics would not do: whitening each half alone gives another result
    alone = torch.cat([whiten(values[:2], mask[:2], shift_mean), whiten(values[2:], mask[2:], shift_mean)])
    assert (alone - whole).abs().max() > 1e-2


def test_whitening_with_a_reduce_on_one_rank_is_the_plain_one():
    values, mask = batch(1)
    torch.testing.assert_close(whiten(values, mask, reduce=lambda t: t), whiten(values, mask), rtol=1e-6, atol=1e-7)


def test_reward_moments_over_two_ranks_are_the_whole_batch_on_every_rank():
    values = torch.randn(10, generator=torch.Generator().manual_seed(2)) * 2 + 5
    more = torch.randn(6, generator=torch.Generator().manual_seed(3))
    whole = RunningMoments()
    whole.update(values)
    whole.update(more)

    def ranks(part, reduce):
        moments = RunningMoments()
        moments.update(part[0], reduce)
        moments.update(part[1], reduce)
        return moments.state_dict()

    states = on_ranks(ranks, [(values[:3], more[:4]), (values[3:], more[4:])])
    for state in states:
        assert state["count"] == 16
        assert state["mean"] == pytest.approx(whole.mean, rel=1e-12)
        assert state["m2"] == pytest.approx(whole.m2, rel=1e-12)
    # by hand: mean and unbiased variance of all 16 values
    every = torch.cat([values, more]).double()
    assert whole.mean == pytest.approx(float(every.mean()), rel=1e-12)
    assert whole.var == pytest.approx(float(every.var()), rel=1e-12)


def test_a_rank_with_no_rows_still_joins_the_reduction():
    values, mask = batch(4)
    empty = (values[:0], mask[:0])
    out = on_ranks(lambda part, reduce: whiten(*part, reduce=reduce), [empty, (values, mask)])
    assert out[0].shape == (0, 9)
    torch.testing.assert_close(out[1], whiten(values, mask), rtol=1e-6, atol=1e-6)
