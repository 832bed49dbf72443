"""Process groups and FSDP2 sharding. A single process needs none of it; under
`torchrun` each rank holds a shard of the model (`fully_shard` per decoder layer, then
the whole policy) and a slice of each step's prompts."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def setup(device: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device); initializes the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device is cuda but no CUDA device is available")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if want_cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if want_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shard(policy: torch.nn.Module) -> None:
    from torch.distributed.fsdp import fully_shard

    for layer in policy.model.get_decoder().layers:
        fully_shard(layer)
    fully_shard(policy)


def all_sum(values: list[float], device: torch.device) -> list[float]:
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def full_model_state(policy: torch.nn.Module, sharded: bool) -> dict:
    """The policy's model weights as full CPU tensors (gathered when sharded)."""
    if not sharded:
        return {k: v.detach().cpu() for k, v in policy.model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k.removeprefix("model."): v for k, v in sd.items()}


def full_optimizer_state(policy, optimizer, sharded: bool) -> dict:
    if not sharded:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(policy, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                 cpu_offload=True))


def load_full_state(policy, optimizer, model_state: dict, optimizer_state: dict, sharded: bool) -> None:
    if not sharded:
        missing, unexpected = policy.model.load_state_dict(model_state, strict=False)
        tied = set(getattr(policy.model, "_tied_weights_keys", None) or [])
        if unexpected or any(k not in tied and not k.endswith("lm_head.weight") for k in missing):
            raise ValueError(f"checkpoint does not match the model: missing {missing}, unexpected {unexpected}")
        policy.model.tie_weights()
        optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, \
        set_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(policy, {"model." + k: v for k, v in model_state.items()}, options=opts)
    set_optimizer_state_dict(policy, optimizer, optimizer_state, options=opts)
