from ldmclip.core.launch import detect_launch, local_process, read_launch, slurm_first_host


def test_launch_is_read_from_torchrun_and_slurm_variables(monkeypatch):
    assert detect_launch({}) is None
    assert detect_launch({"RANK": "0", "WORLD_SIZE": "1"}) is None
    launch = detect_launch({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "MASTER_ADDR": "h", "MASTER_PORT": "1234",
                            "SLURM_PROCID": "0", "SLURM_NTASKS": "2"})
    assert (launch.rank, launch.world_size, launch.local_rank, launch.launcher) == (3, 8, 3, "torchrun")
    monkeypatch.setenv("PATH", "")  # no scontrol: the node list is parsed here
    slurm = {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "4242",
             "SLURM_JOB_NODELIST": "gpu[007-008,010],cpu1"}
    launch = detect_launch(slurm)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.launcher) == (9, 16, 1, "slurm")
    assert (launch.master_addr, launch.master_port) == ("gpu007", 29500 + 4242)
    assert detect_launch({**slurm, "MASTER_ADDR": "head", "MASTER_PORT": "7000"}).master_port == 7000
    assert detect_launch({**slurm, "SLURM_NTASKS": "1"}) is None
    assert slurm_first_host("node12") == "node12"
    assert slurm_first_host("a-b[3,5-9]") == "a-b3"


def test_read_launch_needs_no_rendezvous_and_srun_alone_counts():
    # srun without torchrun: every command must see rank 1 of 2, not a lone rank 0 (cache-text did).
    launch = read_launch({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1"})
    assert (launch.rank, launch.world_size, launch.local_rank, launch.launcher) == (1, 2, 1, "slurm")
    assert read_launch({}).enabled is False
    assert local_process({"SLURM_LOCALID": "1", "SLURM_NTASKS": "2"}) == (1, 2)
