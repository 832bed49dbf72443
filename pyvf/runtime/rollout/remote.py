"""Rollout engines in processes of their own: `EngineProcesses` starts N engine processes
(or, under torchrun, attaches to the job's engine ranks: `--rollout-ranks`), an HF or
vLLM engine each on a copy of the policy's architecture; sends them prompts and takes
their completions back through queues kept in a TCPStore (`StoreQueue`), and publishes
new weights to them over a torch.distributed group of its own (gloo on CPUs, NCCL on
GPUs): trainer rank 0 is rank 0 of that group, the engines ranks 1..N, and the weights
never go through disk.

Each engine process runs two threads: a receiver, which takes part in every weight
broadcast as soon as it is published and stages the new version, and the generator,
which serves requests in order and loads a staged version only between requests. A
request names the policy version it may be generated with: exactly one (one-step-off
pipelines, reproducible) or any at or above a minimum (bounded staleness); every
completion records the version that produced it.
"""

from __future__ import annotations

import datetime
import logging
import os
import pickle
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field

import torch

from pyvf.runtime.rollout.base import Completion, validate_generate_args
from pyvf.runtime.rollout.hf import HFGenerate

log = logging.getLogger("pyvf")

ENGINE_KINDS = ("hf", "vllm")
_TIMEOUT = datetime.timedelta(minutes=30)  # a weight broadcast waits this long for the engines


@dataclass
class WeightLayout:
    """Names, shapes and dtypes of the weights an engine receives, in order; packed into
    one flat buffer per dtype, so a publish is one broadcast per dtype."""
    names: list[str]
    shapes: list[tuple[int, ...]]
    dtypes: list[torch.dtype]

    @classmethod
    def of(cls, named_tensors: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> "WeightLayout":
        """The layout of a state dict; `dtype` replaces every floating dtype (what the engine
        computes in, so a bf16 engine receives bf16)."""
        # A tied weight is sent once: the engine's model ties it too (the same config).
        seen, names = set(), []
        for name, t in named_tensors.items():
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) if t.numel() else None
            if key is None or key not in seen:
                names.append(name)
                seen.add(key)
        dtypes = [dtype if dtype is not None and named_tensors[n].is_floating_point() else named_tensors[n].dtype
                  for n in names]
        return cls(names, [tuple(named_tensors[n].shape) for n in names], dtypes)

    def buffer_dtypes(self) -> list[torch.dtype]:
        return sorted(set(self.dtypes), key=str)

    def sizes(self) -> dict[torch.dtype, int]:
        out: dict[torch.dtype, int] = {}
        for shape, dtype in zip(self.shapes, self.dtypes):
            out[dtype] = out.get(dtype, 0) + _numel(shape)
        return out

    def flatten(self, named_tensors: dict[str, torch.Tensor], device) -> list[torch.Tensor]:
        """One new flat buffer per dtype (in `buffer_dtypes` order), a copy: the trainer may
        update its weights while the buffers are still being sent."""
        missing = [n for n in self.names if n not in named_tensors]
        if missing:
            raise ValueError(f"named_tensors: no {', '.join(missing[:3])} (the weights the engines were built for)")
        out = []
        for dtype in self.buffer_dtypes():
            parts = [named_tensors[n].detach().reshape(-1).to(device=device, dtype=dtype)
                     for n, d in zip(self.names, self.dtypes) if d == dtype]
            out.append(torch.cat(parts) if parts else torch.empty(0, dtype=dtype, device=device))
        return out

    def empty(self, device) -> list[torch.Tensor]:
        sizes = self.sizes()
        return [torch.empty(sizes[d], dtype=d, device=device) for d in self.buffer_dtypes()]

    def unflatten(self, buffers: list[torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
        """(name, view into the buffers) per weight."""
        offsets = {d: 0 for d in self.buffer_dtypes()}
        index = {d: i for i, d in enumerate(self.buffer_dtypes())}
        out = []
        for name, shape, dtype in zip(self.names, self.shapes, self.dtypes):
            n = _numel(shape)
            out.append((name, buffers[index[dtype]][offsets[dtype]:offsets[dtype] + n].view(shape)))
            offsets[dtype] += n
        return out


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _broadcast(group, tensor: torch.Tensor):
    """Rank 0's tensor to every rank of `group` (a bare c10d process group, so no default
    group is needed); returns the Work."""
    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    return group.broadcast([tensor], opts)


def _transfer_group(store, rank: int, size: int, on_gpu: bool):
    """The trainer's and engines' own process group, apart from the training group (which
    a torchrun job's default group is)."""
    import torch.distributed as dist

    prefixed = dist.PrefixStore("pyvf-rollout", store)
    if on_gpu:
        return dist.ProcessGroupNCCL(prefixed, rank, size, dist.ProcessGroupNCCL.Options())
    return dist.ProcessGroupGloo(prefixed, rank, size, _TIMEOUT)


class StoreQueue:
    """A FIFO queue in a c10d store, between processes that share the store (spawned
    engines, torchrun ranks): any number of producers, one consumer. Items are pickled
    plain values (prompts, completions, versions)."""

    def __init__(self, store, name: str):
        self.store, self.name, self.head = store, name, 0

    def put(self, item) -> None:
        index = self.store.add(f"{self.name}/tail", 1)
        self.store.set(f"{self.name}/{index}", pickle.dumps(item))

    def get(self, timeout_s: float | None = None):
        """The next item; raises queue.Empty after timeout_s (None: waits as long as it takes)."""
        key = f"{self.name}/{self.head + 1}"
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        pause = 0.0005
        while not self.store.check([key]):  # polled: a timed-out store wait logs a warning each time
            if deadline is not None and time.monotonic() >= deadline:
                raise queue.Empty
            time.sleep(pause)
            pause = min(2 * pause, 0.02)
        item = pickle.loads(self.store.get(key))
        self.store.delete_key(key)
        self.head += 1
        return item


def _queues(store, engine: int) -> tuple[StoreQueue, StoreQueue, StoreQueue]:
    """(requests, urgent requests, weight versions) of engine `engine` (1..N). An urgent
    request (what the trainer waits on now: a continuation, a refill) is served before the
    queued batches of later steps."""
    return (StoreQueue(store, f"engine{engine}/requests"), StoreQueue(store, f"engine{engine}/urgent"),
            StoreQueue(store, f"engine{engine}/versions"))


def _next_request(requests: StoreQueue, urgent: StoreQueue):
    """The next urgent request when there is one, else the next request (waiting for one,
    polling both as StoreQueue.get polls one)."""
    pause = 0.0005
    while True:
        for q in (urgent, requests):
            try:
                return q.get(timeout_s=0.0)
            except queue.Empty:
                pass
        time.sleep(pause)
        pause = min(2 * pause, 0.02)


def _results(store, trainer_rank: int) -> StoreQueue:
    return StoreQueue(store, f"trainer{trainer_rank}/results")


@dataclass
class EngineSpec:
    """What an engine process builds: the policy's architecture (its transformers config),
    the tokenizer, and the engine's settings."""
    kind: str                      # hf or vllm
    model_config: object           # transformers.PretrainedConfig of the policy
    tokenizer: object
    stop_token_ids: list[int]
    layout: WeightLayout
    dtype: torch.dtype = torch.float32
    threads: int = 1               # CPU threads of the engine process
    device: str = "cpu"            # cpu, or cuda:K
    vllm: dict = field(default_factory=dict)  # VLLMEngine.from_model keywords (cache_dir, max_model_len, ...)
    trainers: int = 1              # trainer ranks that send requests (each has its own results queue)


@dataclass
class _Request:
    ticket: int
    prompts: list[list[int]]
    n: int
    kwargs: dict
    seeds: list[int]
    version: int                   # exact: this version; else the newest staged, at least this one
    exact: bool
    reply_to: int = 0              # the trainer rank whose results queue gets the completions


def _build_engine(spec: EngineSpec, index: int):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(spec.model_config, dtype=spec.dtype)
    model.to(spec.device).eval()
    if spec.kind == "hf":
        return model, HFGenerate(model, spec.tokenizer, stop_token_ids=spec.stop_token_ids)
    return model, None  # vLLM is built once the first weights are in the model (it loads them from disk)


def _engine_process(spec: EngineSpec, index: int, size: int, host: str, port: int) -> None:
    """A spawned engine process: rank `index` (1..N) of the transfer group. It ignores
    SIGTERM and SIGINT, which a preemption sends to the whole process group: the trainer
    may still need the batch in flight for its checkpoint, and ends the engines itself
    (or, if it dies, the store goes and the engine ends with it)."""
    import signal

    import torch.distributed as dist

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    store = dist.TCPStore(host, port, is_master=False, timeout=_TIMEOUT)
    serve(store, spec, index, size)


def serve_engine_rank(store, index: int, size: int, device: str) -> None:
    """A torchrun engine rank (`--rollout-ranks`): takes the engine's spec that trainer
    rank 0 put into the job's store, then serves until the trainer closes it."""
    rollout = _rollout_store(store)
    spec = pickle.loads(rollout.get("spec"))  # waits for trainer rank 0
    spec.device = device
    spec.threads = torch.get_num_threads()  # the rank's own (torchrun's OMP_NUM_THREADS)
    serve(store, spec, index, size, prefixed=True)


def _rollout_store(store):
    import torch.distributed as dist

    return dist.PrefixStore("pyvf-rollout", store)


def serve(store, spec: EngineSpec, index: int, size: int, *, prefixed: bool = False) -> None:
    """Engine `index` (1..N) of `size` - 1: serves requests until a None request comes."""
    if prefixed:
        store = _rollout_store(store)
    requests, urgent, control = _queues(store, index)
    try:
        torch.set_num_threads(spec.threads)
        if spec.device.startswith("cuda"):
            torch.cuda.set_device(torch.device(spec.device))
        store.set(f"engine{index}/up", "1")
        group = _transfer_group(store, index, size, spec.device.startswith("cuda"))
        model, engine = _build_engine(spec, index)
        staged: dict[int, list[torch.Tensor]] = {}
        cond = threading.Condition()
        failure: list[str] = []

        def receive() -> None:
            try:
                while True:
                    version = control.get()
                    if version is None:
                        return
                    buffers = spec.layout.empty(spec.device)
                    for b in buffers:
                        _broadcast(group, b).wait()
                    if spec.device.startswith("cuda"):
                        torch.cuda.synchronize(spec.device)  # the generator thread reads them next
                    with cond:
                        staged[version] = buffers
                        cond.notify_all()
            except BaseException:  # noqa: BLE001 - reported to the trainer by the generator
                with cond:
                    failure.append(traceback.format_exc())
                    cond.notify_all()

        receiver = threading.Thread(target=receive, name=f"pyvf-weights-{index}", daemon=True)
        receiver.start()
        current = -1
        idle = 0.0
        waited_since = time.perf_counter()
        while True:
            req = _next_request(requests, urgent)
            if req is None:
                break
            with cond:
                def ready() -> bool:
                    if req.exact:
                        return current == req.version or req.version in staged
                    return current >= req.version or any(v >= req.version for v in staged)

                cond.wait_for(lambda: bool(failure) or ready())
                if failure:
                    raise RuntimeError(f"engine {index}: receiving weights failed:\n{failure[0]}")
                version = req.version if req.exact else max([current, *staged])
                buffers = staged.get(version)
                for v in [v for v in staged if v <= version]:
                    del staged[v]
            if buffers is not None and version != current:
                named = spec.layout.unflatten(buffers)
                if engine is None:  # vLLM: its first weights come from the model written to disk
                    _load_into(model, named)
                    from pyvf.runtime.rollout.vllm import VLLMEngine

                    options = dict(spec.vllm)
                    if "cache_dir" in options:  # each engine writes its model and caches apart
                        options["cache_dir"] = os.path.join(options["cache_dir"], f"engine{index}")
                    engine = VLLMEngine.from_model(model, spec.tokenizer, stop_token_ids=spec.stop_token_ids,
                                                   dtype=spec.dtype, **options)
                elif spec.kind == "vllm":
                    engine.update_weights(named)
                else:
                    _load_into(model, named)
                current = version
            started = time.perf_counter()
            idle += started - waited_since
            out = engine.generate(req.prompts, req.n, seeds=req.seeds, **req.kwargs)
            waited_since = time.perf_counter()
            _results(store, req.reply_to).put(
                ("done", req.ticket, index, [[(c.ids, c.finish, c.logprobs) for c in group_] for group_ in out],
                 current, idle, waited_since - started))
            idle = 0.0
        receiver.join(timeout=10)  # it ends on the None that close() sends
    except BaseException:  # noqa: BLE001 - every trainer rank raises it with the engine's traceback
        for rank in range(spec.trainers):
            _results(store, rank).put(("error", -1, index, traceback.format_exc(), -1, 0.0, 0.0))


@torch.no_grad()
def _load_into(model, named: list[tuple[str, torch.Tensor]]) -> None:
    state = model.state_dict()
    unknown = [n for n, _ in named if n not in state]
    if unknown:
        raise ValueError(f"weights {', '.join(unknown[:3])} are not in the engine's model")
    for name, tensor in named:
        state[name].copy_(tensor)


@dataclass
class Ticket:
    """Requests sent for one `submit`: per engine, the prompts it took (their positions)."""
    ids: dict[int, list[int]]      # request ticket -> positions of its prompts in the submit
    n_prompts: int


class EngineProcesses:
    """N engines in processes of their own behind the `RolloutEngine` protocol (`generate`
    waits for the newest published weights), plus `submit`/`result` for rollouts that run
    ahead of training and `publish` for new weights. By default it spawns the N processes;
    with `store` it attaches to N torchrun engine ranks serving through that store
    (`serve_engine_rank`), as trainer rank `rank` of `trainers`: every trainer rank sends
    its own requests, rank 0 alone publishes weights (the others only count versions).
    Close it (or use it as a context manager): the engines end with it."""

    on_policy = True  # set per kind in __init__

    def __init__(self, spec: EngineSpec, procs: int, weights: dict[str, torch.Tensor], *, version: int = 0,
                 devices: list[str] | None = None, start_timeout_s: float = 600.0, store=None, rank: int = 0):
        import torch.distributed as dist
        import torch.multiprocessing as mp

        if spec.kind not in ENGINE_KINDS:
            raise ValueError(f"kind must be one of {', '.join(ENGINE_KINDS)}, got {spec.kind!r}")
        if isinstance(procs, bool) or not isinstance(procs, int) or procs < 1:
            raise ValueError(f"procs must be a positive int, got {procs!r}")
        self.name = spec.kind
        self.on_policy = spec.kind == "hf"  # the same weights and numerics as the trainer's HF model
        self.spec = spec
        self.procs = procs
        self.rank = rank
        self.version = -1
        self._on_gpu = spec.device.startswith("cuda")
        self._tickets = 0
        self._done: dict[int, tuple] = {}
        self._times: dict[str, float] = {}
        self._inflight: list = []  # (works, buffers) of the last publish
        self._procs = []
        self._group = None
        if store is None:
            host = "127.0.0.1"
            self._store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False, timeout=_TIMEOUT)
            ctx = mp.get_context("spawn")
            devices = devices or [spec.device] * procs
            for i in range(procs):
                own = EngineSpec(**{**spec.__dict__, "device": devices[i]})
                p = ctx.Process(target=_engine_process, name=f"pyvf-engine-{i + 1}", daemon=True,
                                args=(own, i + 1, procs + 1, host, self._store.port))
                p.start()
                self._procs.append(p)
        else:
            self._store = _rollout_store(store)
            if rank == 0:
                self._store.set("spec", pickle.dumps(spec))
        self._requests, self._urgent, self._control = (list(q) for q in zip(*(_queues(self._store, i + 1)
                                                                              for i in range(procs))))
        self._results = _results(self._store, rank)
        self._closed = False
        self.device = torch.device(spec.device if self._on_gpu else "cpu")
        if rank == 0:
            self._wait_started(start_timeout_s)
            self._group = _transfer_group(self._store, 0, procs + 1, self._on_gpu)
            log.info("rollout: %d %s engine %s, %d CPU thread(s) each, weights over %s", procs, spec.kind,
                     "process(es)" if store is None else "rank(s)", spec.threads, "NCCL" if self._on_gpu else "gloo")
        self.publish(weights, version)

    def _wait_started(self, timeout_s: float) -> None:
        """Until every engine process reached the store (it then joins the transfer group),
        raising at once when one ended first."""
        keys = [f"engine{i + 1}/up" for i in range(self.procs)]
        deadline = time.monotonic() + timeout_s
        while not self._store.check(keys):
            dead = [p for p in self._procs if not p.is_alive()]
            if dead or time.monotonic() > deadline:
                self.close()
                what = (", ".join(f"{p.name} ended (exit code {p.exitcode})" for p in dead) if dead
                        else f"not started after {timeout_s:.0f} s")
                raise RuntimeError(f"rollout engine processes: {what}; its error is above. A script that trains "
                                   f"with engine processes needs an `if __name__ == \"__main__\":` guard (they "
                                   f"are spawned, and import the script)")
            time.sleep(0.05)

    # -- weights -----------------------------------------------------------------------------
    def publish(self, weights: dict[str, torch.Tensor], version: int) -> None:
        """Sends `weights` (full, named as in the model's state_dict) as policy `version` to
        every engine; returns once the buffers are copied (the send runs on), after the
        previous publish completed."""
        if version <= self.version:
            raise ValueError(f"version must grow: {version} after {self.version}")
        if self.rank != 0:  # trainer rank 0 sends; the others' requests name the versions it sent
            self.version = version
            return
        self._wait_published()
        buffers = self.spec.layout.flatten(weights, self.device)
        for c in self._control:
            c.put(version)
        self._inflight = [(_broadcast(self._group, b), b) for b in buffers]
        self.version = version

    def _wait_published(self) -> None:
        for work, _ in self._inflight:
            work.wait()
        self._inflight = []

    def update_weights(self, named_tensors) -> None:
        """The protocol's update: the next version."""
        self.publish(dict(named_tensors), self.version + 1)

    # -- requests ------------------------------------------------------------------------------
    def submit(self, prompts, n, *, max_new_tokens, temperature, seeds, stop=(), min_new_tokens=0,
               version: int | None = None, exact: bool = True, urgent: bool = False) -> Ticket:
        """Sends the prompts to the engines (split evenly, in order) and returns at once.
        `version`: the policy version to generate with (default: the newest published);
        `exact` False lets an engine take any newer one it has. `urgent`: served before
        the requests already queued (not before the one an engine is running)."""
        validate_generate_args(prompts, n, max_new_tokens, temperature, seeds, stop, min_new_tokens)
        version = self.version if version is None else version
        if version > self.version:
            raise ValueError(f"version {version} is not published yet (newest: {self.version})")
        kwargs = dict(max_new_tokens=max_new_tokens, temperature=temperature, stop=list(stop),
                      min_new_tokens=min_new_tokens)
        ids: dict[int, list[int]] = {}
        per = -(-len(prompts) // self.procs) if prompts else 0
        for i in range(self.procs):
            part = list(range(i * per, min((i + 1) * per, len(prompts))))
            if not part:
                continue
            self._tickets += 1
            ids[self._tickets] = part
            queue_ = (self._urgent if urgent else self._requests)[i]
            queue_.put(_Request(self._tickets, [list(prompts[j]) for j in part], n, kwargs,
                                [int(seeds[j]) for j in part], version, exact, self.rank))
        return Ticket(ids, len(prompts))

    def result(self, ticket: Ticket) -> tuple[list[list[Completion]], dict]:
        """The completions of a submit, per prompt in order (each carries the version that
        produced it), and {engine_idle_s, engine_busy_s, wait_s}: the engines' idle and busy
        seconds since their previous request, and how long this call waited."""
        t0 = time.perf_counter()
        out: list[list[Completion] | None] = [None] * ticket.n_prompts
        info = {"engine_idle_s": 0.0, "engine_busy_s": 0.0}
        for tid, part in ticket.ids.items():
            kind, _, index, groups, version, idle, busy = self._take(tid)
            for j, group in zip(part, groups):
                out[j] = [Completion(ids, finish, lp, policy_version=version) for ids, finish, lp in group]
            info["engine_idle_s"] += idle
            info["engine_busy_s"] += busy
        info["wait_s"] = time.perf_counter() - t0
        for key, value in info.items():
            self._times[key] = self._times.get(key, 0.0) + value
        return out, info

    def step_times(self) -> dict:
        """{engine_idle_s, engine_busy_s, wait_s} summed over the results taken since the
        last call (a training step's), then reset."""
        times, self._times = self._times, {}
        return times

    def ready(self, ticket: Ticket) -> bool:
        """Whether `result` would return without waiting."""
        self._drain()
        return all(t in self._done for t in ticket.ids)

    def _drain(self, block_s: float = 0.0) -> None:
        try:
            item = self._results.get(timeout_s=block_s)
        except queue.Empty:
            return
        while True:
            if item[0] == "error":
                self.close()
                raise RuntimeError(f"rollout engine {item[2]} failed:\n{item[3]}")
            self._done[item[1]] = item
            try:
                item = self._results.get(timeout_s=0.0)
            except queue.Empty:
                return

    def _take(self, tid: int) -> tuple:
        while tid not in self._done:
            self._drain(block_s=1.0)
            if tid in self._done:
                break
            dead = [p for p in self._procs if not p.is_alive()]
            if dead:
                self._drain()
                if tid in self._done:
                    break
                codes = ", ".join(f"{p.name} (exit code {p.exitcode})" for p in dead)
                self.close()
                raise RuntimeError(f"rollout engine process ended: {codes}")
        return self._done.pop(tid)

    def generate(self, prompts, n, *, max_new_tokens, temperature, seeds, stop=(), min_new_tokens=0):
        """The protocol's generate: with the newest published weights, waiting for them; the
        trainer waits on it, so it goes before the batches sampled ahead (urgent)."""
        if not prompts:
            validate_generate_args([[0]], n, max_new_tokens, temperature, [0], stop, min_new_tokens)
            return []
        ticket = self.submit(prompts, n, max_new_tokens=max_new_tokens, temperature=temperature, seeds=seeds,
                             stop=stop, min_new_tokens=min_new_tokens, urgent=True)
        return self.result(ticket)[0]

    def sleep(self) -> None:
        pass

    def wake(self) -> None:
        pass

    # -- lifetime --------------------------------------------------------------------------------
    def close(self) -> None:
        """Ends the engines: spawned processes (waits a little, then kills those still
        running), or, from trainer rank 0, the engine ranks."""
        if getattr(self, "_closed", True):  # closed, or never fully started
            return
        self._closed = True
        if self.rank == 0:
            for q in self._requests + self._control:
                try:
                    q.put(None)
                except (RuntimeError, OSError):  # the store is gone (its owner ended)
                    pass
        deadline = time.monotonic() + 10
        for p in self._procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(timeout=5)

    def __enter__(self) -> "EngineProcesses":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def cpu_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def spec_threads(procs: int, threads: int) -> int:
    """CPU threads per engine process: `threads`, or (0) the cores split evenly between the
    trainer and the engines."""
    return threads or max(1, cpu_cores() // (procs + 1))


__all__ = ["ENGINE_KINDS", "EngineProcesses", "EngineSpec", "Ticket", "WeightLayout", "cpu_cores", "spec_threads"]
