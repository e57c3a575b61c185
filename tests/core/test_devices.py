import pytest
import torch

from ldmclip.core.devices import resolve_device
from ldmclip.core.launch import local_process


def test_local_process_reads_torchrun_then_slurm():
    assert local_process({}) == (0, 1)
    assert local_process({"LOCAL_RANK": "3", "WORLD_SIZE": "8", "RANK": "11"}) == (3, 8)
    assert local_process({"SLURM_LOCALID": "2", "SLURM_NTASKS": "4"}) == (2, 4)
    # srun torchrun ...: torchrun's variables win
    assert local_process({"SLURM_LOCALID": "0", "SLURM_NTASKS": "2", "LOCAL_RANK": "1", "WORLD_SIZE": "4"}) == (1, 4)


def test_auto_is_cpu_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_bare_cuda_is_this_process_gpu_under_a_launch(monkeypatch):
    # Before this rule, `cache-text --device cuda` put every torchrun rank on cuda:0.
    assert resolve_device("cuda", local_rank=3, world_size=4) == torch.device("cuda", 3)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert resolve_device("cuda") == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)      # an explicit index is kept


def test_single_process_cuda_is_the_current_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 5)
    assert resolve_device("cuda", local_rank=0, world_size=1) == torch.device("cuda", 5)


def test_unknown_device_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
