"""The CPU emulator that runs csrc/*.cu in the tests (tests/cuda_emulation/): it must compute what a GPU computes
for the constructs the kernels use, and turn misuse CUDA leaves undefined into a launch error."""
import ctypes
import os

import pytest
import torch

import cuda_emulation


@pytest.fixture(scope="module")
def emu():
    if cuda_emulation.cuda_include_dir() is None:
        if os.environ.get("CI") == "true":
            pytest.fail("no CUDA toolkit headers on the CI machine")
        pytest.skip("no CUDA toolkit headers: the emulator cannot be built")
    return cuda_emulation.load_selftest()


def ptr(t):
    return ctypes.c_void_p(t.data_ptr())


def test_butterfly_shuffle_gives_every_lane_the_warp_sum(emu):
    out = torch.full((3 * 96,), float("nan"))
    assert emu.emu_butterfly_sum(ptr(out), 3, 96) == 0
    expected = torch.arange(3 * 96, dtype=torch.float32).view(-1, 32).sum(1, keepdim=True).expand(-1, 32).flatten()
    torch.testing.assert_close(out, expected)


def test_shared_memory_and_block_barrier(emu):
    x = torch.randn(4 * 128)
    out = torch.full((4,), float("nan"))
    assert emu.emu_shared_sum(ptr(x), ptr(out), 4, 128) == 0
    torch.testing.assert_close(out, x.view(4, 128).sum(1), rtol=1e-5, atol=1e-5)


def test_barriers_that_cannot_complete_fail_the_launch(emu):
    assert emu.emu_deadlock() == emu.emu_launch_failure_code()


def test_shuffle_from_an_exited_lane_fails_the_launch(emu):
    out = torch.zeros(32)
    assert emu.emu_shuffle_from_exited_lane(ptr(out)) == emu.emu_launch_failure_code()


def test_exited_threads_do_not_hold_a_barrier_back(emu):
    out = torch.zeros(64)
    assert emu.emu_barrier_after_exit(ptr(out)) == 0
    assert out[:40].eq(1).all() and out[40:].eq(0).all()
