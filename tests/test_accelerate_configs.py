"""configs/accelerate/*.yaml: every file loads with Accelerate's own config loader, passes the checks
`accelerate launch` runs, and turns into the plugin settings it promises (FSDP2, ZeRO-2/3 with a
gatherable 16-bit model, DDP on 8 GPUs, 2 machines x 8 GPUs). Nothing here needs a GPU or deepspeed:
the launcher's environment is built and the plugins are constructed from it, as each process would.
"""

from pathlib import Path

import pytest

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "accelerate"
EXPECTED = {  # file: (distributed_type, num_machines, total processes)
    "single_gpu.yaml": ("NO", 1, 1),
    "ddp_8gpu.yaml": ("MULTI_GPU", 1, 8),
    "fsdp.yaml": ("FSDP", 1, 8),
    "deepspeed_zero2.yaml": ("DEEPSPEED", 1, 8),
    "deepspeed_zero3.yaml": ("DEEPSPEED", 1, 8),
    "two_nodes_ddp.yaml": ("MULTI_GPU", 2, 16),
}


def test_every_config_file_is_listed():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


def launch_args(name: str, *flags: str):
    """What `accelerate launch --config_file NAME [flags] train_loop.py` works out before it starts anything."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    parser = launch_command_parser()
    args = parser.parse_args(["--config_file", str(CONFIGS / name), *flags, "train_loop.py", "--num_epochs", "1"])
    known = {action.dest for action in parser._actions}
    args, defaults, from_config = _validate_launch_command(args)
    return args, defaults, from_config, known


def launch_env(name: str, *flags: str) -> dict:
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args, defaults, from_config, _ = launch_args(name, *flags)
    if args.use_deepspeed:  # as accelerate.commands.launch.launch_command does
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        return prepare_deepspeed_cmd_env(args)[1]
    return prepare_multi_gpu_env(args)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_with_accelerates_loader_and_has_no_unknown_keys(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(CONFIGS / name))  # raises on an unknown top-level key
    kind, machines, processes = EXPECTED[name]
    assert (config.distributed_type.value, config.num_machines, config.num_processes) == (kind, machines, processes)
    # Nested keys are copied onto the launcher's arguments without any check: a typo would be ignored.
    _, _, _, known = launch_args(name)
    for key in config.fsdp_config:
        assert key in known, f"{name}: fsdp_config.{key} is not an `accelerate launch` option"
    for key in config.deepspeed_config:
        assert key in known, f"{name}: deepspeed_config.{key} is not an `accelerate launch` option"


def test_fsdp_config_gives_an_fsdp2_plugin_wrapping_transformer_blocks(monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin

    env = launch_env("fsdp.yaml")
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()  # what Accelerator() builds in each process
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"
    assert plugin.transformer_cls_names_to_wrap is None  # taken from the model's _no_split_modules
    assert plugin.state_dict_type.name == "SHARDED_STATE_DICT"
    assert type(plugin.cpu_offload).__name__ == "OffloadPolicy"  # the no-offload policy (CPUOffloadPolicy offloads)
    assert plugin.use_orig_params is None  # obsolete in FSDP2


@pytest.mark.parametrize("name, stage", [("deepspeed_zero2.yaml", 2), ("deepspeed_zero3.yaml", 3)])
def test_deepspeed_configs_give_the_promised_zero_stage(monkeypatch, name, stage):
    from accelerate.utils import DeepSpeedPlugin

    env = launch_env(name)
    # Not exported, so neither overrides the loop's own values (see the comments in the YAML files).
    assert "ACCELERATE_GRADIENT_ACCUMULATION_STEPS" not in env and "ACCELERATE_GRADIENT_CLIPPING" not in env
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    plugin = DeepSpeedPlugin()  # what Accelerator() builds in each process (deepspeed itself not needed)
    config = plugin.deepspeed_config
    assert config["zero_optimization"]["stage"] == stage
    assert config["gradient_accumulation_steps"] == "auto" and config["gradient_clipping"] == "auto"
    assert config["train_micro_batch_size_per_gpu"] == "auto"  # filled from the loader's batch_size
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "none"
    assert plugin.zero3_init_flag is False
    if stage == 3:  # else accelerator.get_state_dict cannot gather the sharded weights
        assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_two_nodes_config_starts_8_processes_per_machine_and_takes_the_rank_from_the_command_line():
    from accelerate.utils.launch import prepare_multi_gpu_env

    for rank in (0, 1):
        args, *_ = launch_args("two_nodes_ddp.yaml", "--machine_rank", str(rank), "--main_process_ip", "10.0.0.1")
        assert args.multi_gpu and args.num_machines == 2 and args.num_processes == 16
        assert args.machine_rank == rank and args.main_process_ip == "10.0.0.1"
        prepare_multi_gpu_env(args)
        # torchrun's view: 8 processes on each of the 2 nodes, this node's rank, rendezvous on machine 0
        assert (args.nproc_per_node, args.nnodes, args.node_rank) == ("8", "2", rank)
        assert args.rdzv_endpoint == "10.0.0.1:29500" and args.rdzv_backend == "static"
