"""Process groups and FSDP2 sharding. Under `torchrun` each rank holds a shard of the
model (`fully_shard` per decoder layer, then the whole policy) and a slice of each step's
prompts. Mixed precision (bf16 compute, fp32 master weights, gradients reduced in fp32)
is FSDP2's in any number of processes, one included: a single process then gets a
process group of its own."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def job_store():
    """The torchrun job's c10d store (the elastic agent's, or rank 0's), shared by the
    trainer ranks and the engine ranks of `--rollout-ranks`."""
    global _job_store
    if _job_store is None:
        import datetime

        rank = int(os.environ.get("RANK", "0"))
        agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        _job_store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                   is_master=rank == 0 and not agent, wait_for_workers=False,
                                   timeout=datetime.timedelta(minutes=30))
    return _job_store


_job_store = None


def engine_rank(engine_ranks: int) -> int | None:
    """Under torchrun with `engine_ranks` engine ranks (the job's last ranks): this
    process's engine index (1..engine_ranks), or None on a trainer rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if not engine_ranks:
        return None
    if world <= engine_ranks:
        raise ValueError(f"rollout_ranks {engine_ranks} needs torchrun with more processes than that (one trainer "
                         f"at least), got {world}")
    index = int(os.environ.get("RANK", "0")) - (world - engine_ranks) + 1
    return index if index >= 1 else None


def setup(device: str, *, group_of_one: bool = False, engine_ranks: int = 0) -> tuple[int, int, torch.device]:
    """(rank, world size, device); initializes the process group under torchrun, and a
    group of this process alone with `group_of_one` (FSDP2 in one process). With
    `engine_ranks`, the job's last ranks serve rollouts: the default group is then the
    trainer ranks alone, so every collective here, FSDP2's and DCP's stays among them."""
    global _owned
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device is cuda but no CUDA device is available")
    if engine_ranks:
        if engine_rank(engine_ranks) is not None:
            raise ValueError("this is an engine rank (rollout_ranks): it serves rollouts and builds no trainer")
        world -= engine_ranks
        if not dist.is_initialized():
            if want_cuda:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend="nccl" if want_cuda else "gloo",
                                    store=dist.PrefixStore("pyvf-train", job_store()),
                                    rank=int(os.environ.get("RANK", "0")), world_size=world)
            _owned = True
    elif not dist.is_initialized() and world > 1:
        dist.init_process_group(backend="nccl" if want_cuda else "gloo")
        _owned = True
    elif not dist.is_initialized() and group_of_one:
        if want_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if want_cuda else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)
        _owned = True
    rank = dist.get_rank() if world > 1 else 0
    if want_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


_owned = False  # whether setup() created the process group (an in-process vLLM engine makes its own)


def teardown() -> None:
    global _owned
    if _owned and dist.is_initialized():
        dist.destroy_process_group()
    _owned = False


def _active() -> bool:
    """More than one process (an in-process vLLM engine may hold a group of one)."""
    return dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if _active():
        dist.barrier()


def shard(policy: torch.nn.Module, *, mixed_precision: bool = False) -> None:
    """FSDP2 per decoder layer, then the whole policy; with `mixed_precision` the layers
    compute in bf16 from fp32 master weights and gradients are reduced in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision
          else MixedPrecisionPolicy())
    for layer in policy.model.get_decoder().layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(policy, mp_policy=mp)


def all_sum(values: list[float], device: torch.device) -> list[float]:
    if not _active():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_sum_tensor(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Element-wise sum of a CPU tensor over ranks (itself in one process)."""
    if not _active():
        return t
    out = t.to(device)
    dist.all_reduce(out)
    return out.cpu()


def all_gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] (picklable objects; [obj] in one process)."""
    if not _active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_max(value: float, device: torch.device) -> float:
    if not _active():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def full_model_state(policy: torch.nn.Module, sharded: bool) -> dict:
    """The policy's model weights as full CPU tensors (gathered when sharded)."""
    if not sharded:
        return {k: v.detach().cpu() for k, v in policy.model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k.removeprefix("model."): v for k, v in sd.items()}


def load_optimizer_state(optimizer, optimizer_state: dict) -> None:
    """Loads a legacy checkpoint's optimizer.pt (one process) or optimizer-rank{r}.pt
    (this rank's shard, plain local tensors), rebuilding the DTensor shards of sharded parameters."""
    from torch.distributed.tensor import DTensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    for pid, st in optimizer_state["state"].items():
        p = params[int(pid)]
        if isinstance(p, DTensor):
            for k, v in st.items():
                if torch.is_tensor(v) and v.dim() > 0:
                    st[k] = DTensor.from_local(v.to(p.device), p.device_mesh, p.placements, run_check=False,
                                               shape=p.shape, stride=p.stride())
    optimizer.load_state_dict(optimizer_state)
