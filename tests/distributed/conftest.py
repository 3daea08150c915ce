"""DeepSpeed on CPU: the accelerator is forced to the CPU, and in-process tests join a process group of one rank."""

import os
import socket

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def single_rank():
    """The environment a launcher would give rank 0 of 1 (DeepSpeed falls back to MPI without it). The gloo group
    it starts stays up for the rest of the session: DeepSpeed keeps its communication backend for the process's
    lifetime."""
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(autouse=True)
def restore_functional_linear():
    """A ZeRO-3 engine replaces ``torch.nn.functional.linear`` for the rest of the process ("This will persist
    unless manually reset", DeepSpeed's own log): a stage process has one engine, but this test session goes on to
    tests that count what plain autograd saves."""
    import torch

    linear = torch.nn.functional.linear
    yield
    torch.nn.functional.linear = linear
