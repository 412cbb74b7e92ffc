"""One job on several devices: which rank this process is, and the few things its ranks must agree on.

A job with `resources.gpus` N > 1 runs as N ranks that torchrun's launcher (torch.distributed.elastic,
started by worker/launcher.py) forks, with RANK, WORLD_SIZE and the rendezvous address in their
environment; Trainer (through accelerate) sets up the process group from them: DDP, on NCCL with GPUs
and on gloo without, where each "device" is a process. Rank 0 is the leader: it alone writes events,
checkpoints and the trained model, and publishes; every rank trains. torch is imported where it is
used: the worker process, which imports this module through worker/train_job.py, never imports it.
"""

import os

# Why a run stops at the end of a step, in the order the ranks settle on (the largest wins).
RUNNING, PREEMPTED, PAUSED, CANCELLED = 0, 1, 2, 3


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_leader() -> bool:
    return rank() == 0


def _grouped() -> bool:
    if world_size() == 1:
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def agree(value: int) -> int:
    """The largest of the ranks' `value`s, on every rank: they must stop at the same step, and a stop
    request may reach one rank's database read, or signal, before another's."""
    if not _grouped():
        return value
    import torch
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def wait_for_all() -> None:
    """Every rank reaches this point before any goes on (a checkpoint all of them have written)."""
    if _grouped():
        import torch.distributed as dist

        dist.barrier()


def lost_a_rank(error: BaseException) -> bool:
    """Whether `error` is a collective that failed because another rank of the group went away (it was
    killed, or crashed): then the attempt ends like a crashed one and is retried, instead of the error
    being recorded as the job's own."""
    if world_size() == 1:
        return False
    import torch.distributed as dist

    text = str(error)
    return isinstance(error, dist.DistError) or any(name in text for name in ("gloo", "NCCL", "c10d"))


def trainer_arguments(peft: str, checkpoints_blocks: bool) -> dict[str, object]:
    """TrainingArguments for a multi-rank run. Trainer already averages the loss over every rank's tokens
    (`average_tokens_across_devices`), so N ranks of batch b train as one process of batch N x b would.

    On GPUs, full and freeze fine-tuning shard the model's weights, gradients and optimizer states across
    the ranks with FSDP, each transformer block a unit (the model's `_no_split_modules`, accelerate's
    default), in bf16 where the GPU has it (Trainer's `bf16`); checkpoints and the trained model are saved
    whole (FULL_STATE_DICT), as ordinary safetensors. accelerate runs FSDP on GPUs only: CPU ranks, and
    adapter methods everywhere, keep a whole copy per rank (DDP). The run reports which it was (`sharded`
    in its "Training finished" event).
    """
    if world_size() == 1:
        return {}
    import torch

    from app.estimate.planner import SHARDED_METHODS

    if not torch.cuda.is_available():
        # Without use_cpu, accelerate sees no device to spread over: Trainer's world size stays 1 while
        # TRL's accelerator counts the ranks, and the loss is scaled for token counts never summed.
        return {"ddp_backend": "gloo", "use_cpu": True}
    arguments: dict[str, object] = {"ddp_backend": "nccl"}
    if peft in SHARDED_METHODS:
        arguments |= {
            "fsdp": "full_shard auto_wrap",
            # FSDP recomputes the blocks itself: Trainer's own checkpointing would all-gather them twice.
            "fsdp_config": {
                "activation_checkpointing": checkpoints_blocks,
                "state_dict_type": "FULL_STATE_DICT",
            },
            "gradient_checkpointing": False,
        }
    return arguments
