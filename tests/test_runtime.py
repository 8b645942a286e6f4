"""sidfast.utils.runtime: device names and their errors, seeding and RNG state, autocast per precision.
(A tests/utils/ folder would shadow tests/utils.py, the shared helpers, hence this file's place.)"""
import pytest
import torch

from sidfast.utils import runtime


def test_device_errors():
    from sidfast.utils.runtime import resolve_device

    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(ValueError, match="not a device name"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU is available.*--device cpu"):
            resolve_device("cuda")
        assert resolve_device("auto").type == "cpu"


def test_resolve_device_names_and_errors():
    assert runtime.resolve_device(" CPU ").type == "cpu"
    with pytest.raises(ValueError, match="device 'meta' is not supported here; use auto, cpu, cuda or cuda:N"):
        runtime.resolve_device("meta")
    count = torch.cuda.device_count()
    if count:
        assert runtime.resolve_device("cuda", local_rank=count - 1) == torch.device("cuda", count - 1)
        with pytest.raises(ValueError, match=f"device cuda:{count} does not exist; {count} GPU"):
            runtime.resolve_device(f"cuda:{count}")


def test_rng_state_round_trip_restores_every_stream():
    import random

    import numpy as np

    runtime.seed_everything(3, rank=1, world=2)
    state = runtime.rng_state(torch.device("cpu"))
    first = (torch.rand(3), np.random.rand(3), random.random())
    runtime.set_rng_state(state, torch.device("cpu"))
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and (first[1] == again[1]).all() and first[2] == again[2]


def test_seed_everything_differs_per_rank_and_repeats_per_seed():
    draws = []
    for seed, rank in [(0, 0), (0, 1), (0, 0)]:
        runtime.seed_everything(seed, rank=rank, world=2)
        draws.append(torch.rand(4))
    assert torch.equal(draws[0], draws[2]) and not torch.equal(draws[0], draws[1])


def test_autocast_per_precision():
    cpu = torch.device("cpu")
    with runtime.autocast(cpu, "fp32"):
        assert not torch.is_autocast_enabled("cpu")
    with runtime.autocast(cpu, "bf16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
