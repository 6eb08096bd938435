"""Set-up of the one-shot all-reduce (`engine.distributed.oneshot`): its switches, and that a
group that cannot run it (CPU ranks, gloo) falls back to the plain collectives. The kernel itself:
tests/backends/triton/test_allreduce.py; on GPUs: bench/multi_gpu.py --parts oneshot,allreduce."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import hal
from engine.distributed import oneshot


@pytest.fixture(scope="module")
def cpu_backend(cpu_caps):
    return hal.load_backend(cpu_caps, configured="cpu")


def test_size_limit_defaults_and_override(monkeypatch) -> None:
    monkeypatch.delenv("HAL_ONESHOT_ALLREDUCE_MAX_BYTES", raising=False)
    assert oneshot.max_bytes(2) == 4 * 1024 * 1024
    assert oneshot.max_bytes(4) == oneshot.max_bytes(8) == 512 * 1024
    monkeypatch.setenv("HAL_ONESHOT_ALLREDUCE_MAX_BYTES", "65536")
    assert oneshot.max_bytes(2) == 65536
    monkeypatch.setenv("HAL_ONESHOT_ALLREDUCE_MAX_BYTES", "1MB")
    with pytest.raises(ValueError, match="'1MB' is not an integer"):
        oneshot.max_bytes(2)
    monkeypatch.setenv("HAL_ONESHOT_ALLREDUCE_MAX_BYTES", "0")
    with pytest.raises(ValueError, match="must be > 0"):
        oneshot.max_bytes(2)


def test_low_latency_row_limit_default_and_override(monkeypatch) -> None:
    monkeypatch.delenv("HAL_ONESHOT_LL_MAX_ROWS", raising=False)
    assert oneshot.ll_max_rows(16) == 16  # the kernel module's default, passed in
    monkeypatch.setenv("HAL_ONESHOT_LL_MAX_ROWS", "0")
    assert oneshot.ll_max_rows(16) == 0  # never
    monkeypatch.setenv("HAL_ONESHOT_LL_MAX_ROWS", "eight")
    with pytest.raises(ValueError, match="'eight' is not an integer"):
        oneshot.ll_max_rows(16)
    monkeypatch.setenv("HAL_ONESHOT_LL_MAX_ROWS", "-1")
    with pytest.raises(ValueError, match="must be >= 0"):
        oneshot.ll_max_rows(16)


def test_gemm_push_switch(monkeypatch) -> None:
    monkeypatch.delenv("HAL_ONESHOT_GEMM_PUSH", raising=False)
    assert oneshot.gemm_push()
    monkeypatch.setenv("HAL_ONESHOT_GEMM_PUSH", "0")
    assert not oneshot.gemm_push()


class _Backend:
    name = "test"

    def __init__(self, why):
        self.why = why

    def peer_all_reduce_reason(self):
        return self.why


def test_reasons_it_cannot_run(monkeypatch, cpu_backend) -> None:
    cpu = torch.device("cpu")
    assert "not a CUDA GPU" in oneshot.unavailable_reason(cpu_backend, cpu)
    assert "has no one-shot all-reduce kernel" in cpu_backend.peer_all_reduce_reason()
    gpu = torch.device("cuda", 0)
    assert oneshot.unavailable_reason(_Backend("ROCm: no"), gpu, 2) == "ROCm: no"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    why = oneshot.unavailable_reason(_Backend(None), gpu, world=2)
    assert why == "this process sees 1 GPU(s), fewer than the group's 2 ranks"
    monkeypatch.setenv("HAL_ONESHOT_ALLREDUCE", "0")
    assert oneshot.unavailable_reason(_Backend(None), gpu) == "HAL_ONESHOT_ALLREDUCE=0"


def test_a_cpu_group_keeps_the_plain_collectives(monkeypatch, cpu_backend) -> None:
    from engine.distributed.collectives import TorchCollectives
    from engine.distributed.executor import free_port

    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    try:
        assert oneshot.build_workspace(cpu_backend, None) is None
        coll = TorchCollectives(None, [0])
        x = torch.arange(4.0)
        assert coll.all_reduce_rms_norm(x, x, torch.ones(4), 1e-5) is None
        assert torch.equal(coll.all_reduce(x.clone()), x)
        # The self-test a GPU group runs on its workspace, here on one rank's buffer (a group of
        # one signals and reads only itself): on the GPU when there is one, else the interpreted
        # kernel on the CPU.
        pytest.importorskip("triton")
        from backends.triton.allreduce import OneShotWorkspace, buffer_bytes
        from backends.triton.quant import interpreting

        device = torch.device("cpu" if interpreting() else "cuda")
        if device.type == "cuda" and not torch.cuda.is_available():
            pytest.skip("no GPU and TRITON_INTERPRET is not 1")
        buf = torch.zeros(buffer_bytes(1, 3072, 2), dtype=torch.uint8, device=device)
        ws = OneShotWorkspace.create(0, 1, [buf.data_ptr()], 3072, 2, device)
        assert oneshot._self_test(ws, 0, 1, device, None)
        assert ws.spin_limit == 1 << 26  # restored after the test's shorter limit
    finally:
        dist.destroy_process_group()
