"""Distributed presets, `finetune launch-config`, and real multi-process runs on CPU: two machines on
loopback (one process each) and a 2-process DDP QLoRA run, each ending with identical weights on
every rank and one writer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import finish, invoke, start
from finetune.launch.presets import preset_names, preset_path
from finetune.launch.relaunch import free_port


def accelerate_launch_env(config_file: str, *flags: str) -> tuple[object, dict[str, str]]:
    """What `accelerate launch --config_file FILE FLAGS -m finetune` would give the ranks, without
    starting them: accelerate's own argument parsing, config validation and environment preparation."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", config_file, *flags, "-m", "finetune"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        # as accelerate's launch_command does before its DeepSpeed launcher
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    return args, env


def test_presets_ship_with_the_package():
    assert preset_names() == ["ddp", "deepspeed-zero2", "deepspeed-zero3", "fsdp"]
    assert all(preset_path(name).parent.name == "presets" for name in preset_names())


@pytest.mark.parametrize("name", ["ddp", "fsdp", "deepspeed-zero2", "deepspeed-zero3"])
def test_every_preset_is_accepted_by_accelerate(name, monkeypatch):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(preset_path(name)))  # accelerate's own schema
    args, env = accelerate_launch_env(str(preset_path(name)), "--num_processes", "2")
    assert args.num_processes == 2 and env["ACCELERATE_MIXED_PRECISION"] == "no"
    if name == "ddp":
        assert config.distributed_type == "MULTI_GPU" and args.multi_gpu
    elif name == "fsdp":
        assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
        assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
        # The plugin the ranks build from that environment: FSDP2, one shard group per transformer block.
        from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

        from accelerate.utils import FullyShardedDataParallelPlugin

        for key, value in env.items():
            monkeypatch.setenv(key, value)
        plugin = FullyShardedDataParallelPlugin()
        assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
        assert plugin.auto_wrap_policy is transformer_auto_wrap_policy
        assert "FULL_STATE_DICT" in str(plugin.state_dict_type)
    else:
        stage = name[-1]
        assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
        assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == stage
        assert args.deepspeed_multinode_launcher == "standard"


def printed_config(*flags: str) -> dict:
    code, stdout, stderr = invoke("launch-config", *flags)
    assert code == 0, stderr
    assert stdout.startswith("# accelerate config for this run")
    return yaml.safe_load(stdout)


def test_launch_config_fills_in_the_run_and_accelerate_takes_it(tmp_path):
    config = printed_config("--distributed", "fsdp", "-n", "16", "--num-machines", "2", "--machine-rank", "1",
                            "--main-process-ip", "10.0.0.7", "--bf16")
    assert config["distributed_type"] == "FSDP" and config["fsdp_config"]["fsdp_version"] == 2
    assert (config["num_processes"], config["num_machines"], config["machine_rank"]) == (16, 2, 1)
    assert (config["main_process_ip"], config["main_process_port"]) == ("10.0.0.7", 29500)
    assert config["mixed_precision"] == "bf16"

    path = tmp_path / "printed.yaml"
    path.write_text(yaml.safe_dump(config))
    args, env = accelerate_launch_env(str(path))
    assert env["FSDP_VERSION"] == "2" and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    assert (args.nproc_per_node, args.nnodes, args.node_rank) == ("8", "2", 1)  # 8 processes on each machine
    assert args.rdzv_endpoint == "10.0.0.7:29500" and args.rdzv_backend == "static"


def test_launch_config_from_a_recipe_and_a_user_file(tmp_path):
    own = tmp_path / "mine.yaml"
    own.write_text(yaml.safe_dump({"compute_environment": "LOCAL_MACHINE", "distributed_type": "MULTI_GPU",
                                   "num_processes": 8, "gpu_ids": "0,1", "rdzv_backend": "static"}))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"train:\n  distributed: {own}\n  num_processes: 2\n")
    config = printed_config(str(recipe), "--set", "train.main_process_port=29999")
    assert config["gpu_ids"] == "0,1"  # the user's own settings stay
    assert (config["num_processes"], config["num_machines"], config["main_process_port"]) == (2, 1, 29999)
    assert "main_process_ip" not in config
    # Single machine without a port: 0 asks accelerate for a free one.
    assert printed_config("-n", "2")["main_process_port"] == 0
    # Flags override the recipe, --set overrides both.
    assert printed_config(str(recipe), "-n", "4")["num_processes"] == 4
    assert printed_config(str(recipe), "-n", "4", "--set", "train.num_processes=6")["num_processes"] == 6
    assert printed_config("--bf16", "--set", "train.bf16=false")["mixed_precision"] == "no"


@pytest.mark.parametrize("args, message", [
    (["--distributed", "fdsp"], "train.distributed: unknown preset 'fdsp' (did you mean 'fsdp'?); choose one of ddp, "
                                "deepspeed-zero2, deepspeed-zero3, fsdp, or give the path of an accelerate config file"),
    (["--distributed", "missing.yaml"], "train.distributed: no such accelerate config file 'missing.yaml'"),
    (["-n", "2", "--num-machines", "2"], "train.main_process_ip: required with train.num_machines=2; pass "
                                         "--main-process-ip <address of machine 0>"),
    (["-n", "2", "--num-machines", "2", "--machine-rank", "2", "--main-process-ip", "127.0.0.1"],
     "train.machine_rank: 2 is not below train.num_machines=2; machine ranks go from 0 to 1"),
    (["-n", "3", "--num-machines", "2", "--main-process-ip", "127.0.0.1"],
     "train.num_processes: 3 processes do not split evenly over 2 machines; it counts the processes on all "
     "machines together, so use a multiple of train.num_machines"),
])
def test_bad_distributed_input(args, message, tiny_gpt, toy_text, tmp_path):
    code, _, stderr = invoke("lora", "--model", tiny_gpt, "--data", toy_text, "-o", tmp_path / "r", *args)
    assert code == 2
    assert stderr.strip() == f"error: {message}"
    code, _, stderr = invoke("launch-config", *args)
    assert code == 2 and stderr.strip() == f"error: {message}"


def test_deepspeed_preset_on_cpu_is_refused(tiny_gpt, toy_text, tmp_path):
    code, _, stderr = invoke("lora", "--model", tiny_gpt, "--data", toy_text, "-o", tmp_path / "r",
                             "-n", "2", "--distributed", "deepspeed-zero2")
    assert code == 2
    assert stderr.strip() == ("error: train.distributed: deepspeed-zero2 needs CUDA GPUs and none is visible; "
                              "use the ddp preset on CPU")


# ---------------------------------------------------------------------------------------
# Real runs


def saved_adapter_fingerprint(run_dir: Path) -> str:
    """The fingerprint of the adapter on disk, computed the way each rank computed its own."""
    from peft import AutoPeftModelForCausalLM

    from finetune.launch.replicas import weights_fingerprint

    model = AutoPeftModelForCausalLM.from_pretrained(str(run_dir), is_trainable=True)
    return weights_fingerprint([p for p in model.parameters() if p.requires_grad])


def check_one_writer_and_identical_replicas(run_dir: Path, outputs: list[str], world_size: int) -> None:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == world_size
    fingerprints = metrics["replica_fingerprints"]
    assert len(fingerprints) == world_size and len(set(fingerprints)) == 1, fingerprints
    assert fingerprints[0] == saved_adapter_fingerprint(run_dir)  # what was saved is what every rank holds
    steps = [json.loads(line)["step"] for line in (run_dir / "log.jsonl").read_text().splitlines()
             if "loss" in json.loads(line) and "train_loss" not in json.loads(line)]
    assert steps and len(steps) == len(set(steps)), steps  # a second writer would repeat every step
    assert sum(out.count("finished: ") for out in outputs) == 1
    assert "warning: the ranks finished with different weights" not in "".join(outputs)


def test_two_machines_on_loopback(tiny_gpt, toy_text, tmp_path):
    run_dir, port = tmp_path / "run", free_port()
    common = ["lora", "--model", tiny_gpt, "--data", toy_text, "-o", run_dir, "--max-steps", "6",
              "--set", "train.batch_size=8", "--set", "train.logging_steps=1", "--set", "data.max_eval_samples=8",
              "-n", "2", "--num-machines", "2", "--main-process-ip", "127.0.0.1", "--main-process-port", port]
    machines = [start(*common, "--machine-rank", str(rank)) for rank in (0, 1)]
    outputs = [finish(m) for m in machines]
    assert "launching 1 process (ddp) on machine 1 of 2" in outputs[1]
    assert "finished: " in outputs[0]  # machine 0 writes the run
    for chatter in ("Reducer", "find_unused_parameters", "strongly recommend passing", "Traceback"):
        assert chatter not in "".join(outputs), chatter  # library chatter stays out unless --debug
    check_one_writer_and_identical_replicas(run_dir, outputs, world_size=2)


# Slow (37 s): two processes of 4-bit QLoRA on CPU. DDP's one writer and identical replicas stay in the
# fast suite through test_cli's two-process run and the two-machine run above.
@pytest.mark.slow
def test_two_process_ddp_qlora(tiny_gpt, toy_text, tmp_path):
    run_dir = tmp_path / "run"
    out = finish(start("lora", "--model", tiny_gpt, "--data", toy_text, "-o", run_dir, "--max-steps", "6",
                       "--set", "train.batch_size=8", "--set", "train.logging_steps=1",
                       "--set", "data.max_eval_samples=8", "-n", "2", "--distributed", "ddp", "--quant", "4bit"))
    assert "launching 2 processes (ddp)" in out
    check_one_writer_and_identical_replicas(run_dir, [out], world_size=2)
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    assert recipe["quant"]["bits"] == 4 and recipe["train"]["distributed"] == "ddp"


def test_fsdp_on_cpu_shards_saves_an_ordinary_model_and_resumes(tiny_gpt, toy_text, tmp_path):
    """The fsdp preset on CPU runs FSDP2 over gloo (not DDP): each rank holds half the parameter values, the
    checkpoint is FSDP's, the run directory an ordinary model folder, and --resume continues from it."""
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    common = ["full", "--model", tiny_gpt, "--data", toy_text, "-o", run_dir, "--set", "train.batch_size=8",
              "--set", "train.logging_steps=1", "--set", "train.save_steps=3", "--set", "data.max_eval_samples=8",
              "-n", "2", "--distributed", "fsdp"]
    out = finish(start(*common, "--max-steps", "3"))
    assert "launching 2 processes (fsdp)" in out and "find_unused_parameters" not in out
    metrics = json.loads((run_dir / "metrics.json").read_text())
    total = metrics["total_params"]
    assert metrics["world_size"] == 2 and sum(metrics["shard_values"]) == total
    assert max(metrics["shard_values"]) < 0.6 * total  # sharded, not replicated
    assert {"pytorch_model_fsdp.bin", "optimizer.bin", "manifest.json"} <= {
        p.name for p in (run_dir / "checkpoints" / "checkpoint-3").iterdir()}
    model = AutoModelForCausalLM.from_pretrained(run_dir)
    assert sum(p.numel() for p in model.parameters()) == total
    out = finish(start(*common, "--max-steps", "6", "--resume"))
    assert "resuming from checkpoint-3 (step 3)" in out
    logged = [r for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5, 6]
    # The same recipe under ddp logs the same losses in float32 (under bf16 they differ by up to 0.2%: FSDP's
    # mixed precision casts the parameters to bf16, where ddp autocasts the operations).
    ddp_dir = tmp_path / "ddp"
    finish(start(*[ddp_dir if a == run_dir else a for a in common[:-1]], "ddp", "--max-steps", "3"))
    ddp = [r["loss"] for r in map(json.loads, (ddp_dir / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert ddp == pytest.approx([r["loss"] for r in logged[:3]], rel=1e-5)
