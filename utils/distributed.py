"""Process groups, seeds, FSDP2 sharding and the collectives the training loop needs.

Parallelism is applied from outside (the torchtitan way): `model/` never imports torch.distributed; this file wraps
the networks of a `Models` bundle with `fully_shard` (one unit per transformer block, then the root), gathers full
state dicts for checkpoints and loads them back into sharded modules. Every helper also works in a single process
without a process group (plain modules, no collectives), so tests and small runs need no torchrun.
"""
from __future__ import annotations

import contextlib
import datetime
import itertools
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from utils.errors import InputError, InputKeyError

try:  # DTensor is what FSDP2 turns parameters into; absent only on builds without distributed support
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = ()  # type: ignore[assignment]

_SEED_RANGE = 10_000_000  # the original draws seeds in [0, 1e7)


@dataclass
class DistState:
    """Where this process sits. `owns_group`: the group was created here and `cleanup` destroys it."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """True when models are wrapped with FSDP2 (a process group exists)."""
        return dist.is_available() and dist.is_initialized()


def init_distributed(device: str | None = None, timeout_minutes: int = 30) -> DistState:
    """Join the torchrun job described by RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT, or run alone.

    NCCL on CUDA, gloo on CPU. Without torchrun variables: one process; on CUDA a process group of one is still
    created (in-memory store) so that FSDP2's bf16 parameter policy applies exactly as in multi-GPU runs.
    `device`: "cpu" forces CPU even when CUDA is present; None picks CUDA when available.
    """
    use_cuda = torch.cuda.is_available() and device != "cpu"
    backend = "nccl" if use_cuda else "gloo"
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        return _state(rank, local_rank, world, use_cuda, dist.get_backend(), owns=False)
    env_world = os.environ.get("WORLD_SIZE")
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if env_world is not None and int(env_world) > 1:
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off (it can wedge shared hosts)
        rank, world = int(os.environ["RANK"]), int(env_world)
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        if use_cuda:
            torch.cuda.set_device(local_rank)
        # env:// reads MASTER_ADDR/MASTER_PORT itself (IPv6 addresses included).
        device_id = torch.device("cuda", local_rank) if use_cuda else None
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world, timeout=timeout,
                                device_id=device_id)
        if not use_cuda and "OMP_NUM_THREADS" not in os.environ:
            # CPU ranks on one host share its cores; oversubscribed threads make gloo runs ~10x slower.
            torch.set_num_threads(host_threads(int(os.environ.get("LOCAL_WORLD_SIZE", world))))
        return _state(rank, local_rank, world, use_cuda, backend, owns=True)
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout,
                                device_id=torch.device("cuda", local_rank))
        return _state(0, local_rank, 1, True, backend, owns=True)
    return DistState()


def host_threads(local_world_size: int) -> int:
    """This rank's share of the host's cores (the ranks of one host split them evenly)."""
    return max(1, (os.cpu_count() or 1) // max(1, local_world_size))


def _state(rank: int, local_rank: int, world: int, use_cuda: bool, backend: str, owns: bool) -> DistState:
    if use_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True  # as the original launcher
        torch.backends.cudnn.allow_tf32 = True
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return DistState(rank, local_rank, world, local_world, device, backend, owns)


def cleanup_distributed(state: DistState) -> None:
    """Barrier, then destroy the group we created. On gloo, a rank that closes its connections while a peer is still
    finishing the last collective makes that peer abort ("terminate called without an active exception"): the
    ranks first meet in the store, which carries no gloo traffic."""
    if state.owns_group and dist.is_initialized():
        dist.barrier()
        if dist.get_backend() == "gloo" and dist.get_world_size() > 1:
            _store_exit_barrier()
        dist.destroy_process_group()


_EXIT_ROUNDS = itertools.count()


def _store_exit_barrier(timeout_s: float = 300.0) -> None:
    """Every rank has returned from its last collective before any leaves; rank 0 (which may host the store) leaves
    last, once the others are done with the store."""
    store = dist.distributed_c10d._get_default_store()
    world, rank = dist.get_world_size(), dist.get_rank()
    deadline = time.monotonic() + timeout_s

    def wait_for(key: str, count: int) -> None:
        while int(store.add(key, 0)) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"ranks did not reach the exit barrier ({key}) within {timeout_s:.0f} s")
            time.sleep(0.005)
    round_ = next(_EXIT_ROUNDS)  # every rank cleans up as often (a store can outlive a group: torchrun's agent's)
    arrived, left = f"sf_exit_arrived_{round_}", f"sf_exit_left_{round_}"
    store.add(arrived, 1)
    wait_for(arrived, world)
    if rank != 0:
        store.add(left, 1)
    else:
        wait_for(left, world - 1)


# ------------------------------------------------------------------------------------------------ collectives

def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if _active():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` of rank `src` on every rank (pickled; for small choices such as seeds and exit steps)."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool, device: torch.device | None = None) -> bool:
    """True on every rank when `flag` is true on at least one (so all ranks skip a bad step together)."""
    if not _active():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device or _collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def mean_over_ranks(logs: dict[str, float]) -> dict[str, float]:
    """Average scalar logs over ranks (keys missing on a rank are averaged over the ranks that have them)."""
    gathered = all_gather_object(logs)
    keys = sorted({k for d in gathered for k in d})
    return {k: float(np.mean([d[k] for d in gathered if k in d])) for k in keys}


def _collective_device() -> torch.device:
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ------------------------------------------------------------------------------------------------------ seeds

def resolve_seed(seed: int) -> int:
    """`seed`, or (seed == 0, the shipped value) a random seed drawn on rank 0 and broadcast to every rank."""
    if seed == 0:
        seed = random.SystemRandom().randrange(1, _SEED_RANGE)
    return int(broadcast_object(seed))


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain containers (storable with torch.load(weights_only=True))."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------------------- FSDP2

def _mesh(state: DistState, strategy: str):
    """1-D mesh for full sharding; (replicate, shard) for the hybrid strategies and no_shard (FSDP2's HSDP)."""
    from torch.distributed.device_mesh import init_device_mesh

    kind = state.device.type
    world, local = state.world_size, max(1, min(state.local_world_size, state.world_size))
    if strategy == "no_shard":
        return init_device_mesh(kind, (world, 1), mesh_dim_names=("replicate", "shard"))
    if strategy in ("hybrid_full", "hybrid_zero2") and world % local == 0 and world > local:
        return init_device_mesh(kind, (world // local, local), mesh_dim_names=("replicate", "shard"))
    return init_device_mesh(kind, (world,), mesh_dim_names=("shard",))


def transformer_blocks(module: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a DiT (`module.blocks`), looking through adapters that wrap it."""
    blocks = getattr(module, "blocks", None)
    if blocks is None and hasattr(module, "get_base_model"):
        blocks = getattr(module.get_base_model(), "blocks", None)
    return list(blocks) if blocks is not None else []


def _fsdp_kwargs(state: DistState, mixed_precision: bool, strategy: str, cpu_offload: bool, mesh) -> dict[str, Any]:
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

    kwargs: dict[str, Any] = {"mesh": mesh if mesh is not None else _mesh(state, strategy),
                              "reshard_after_forward": reshards_after_forward(strategy)}
    if mixed_precision and state.device.type == "cuda":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                                   cast_forward_inputs=False)
    else:
        kwargs["mp_policy"] = MixedPrecisionPolicy(cast_forward_inputs=False)
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    return kwargs


def reshards_after_forward(strategy: str) -> bool:
    """Whether FSDP frees a unit's gathered parameters after its forward (all but ZeRO-2-like hybrid_zero2)."""
    return strategy != "hybrid_zero2"


@contextlib.contextmanager
def gathered_across_forwards(module: nn.Module, strategy: str) -> Iterator[None]:
    """Within: an FSDP2-sharded `module` keeps each unit's parameters gathered after its forward, so the many forwards
    of a self-forcing rollout (denoising steps and a cache pass per block) all-gather each unit once instead of once
    per forward; at exit they are freed and the strategy's behaviour restored (a backward through the rollout gathers
    them again, as after any forward). Costs one gathered bf16 copy of the network. No-op when not sharded."""
    from torch.distributed.fsdp import FSDPModule
    if not isinstance(module, FSDPModule):
        yield
        return
    module.set_reshard_after_forward(False)
    try:
        yield
    finally:
        module.set_reshard_after_forward(reshards_after_forward(strategy))  # as shard_module set every unit
        for unit in module.modules():
            if isinstance(unit, FSDPModule):
                unit.reshard()


def shard_module(module: nn.Module, state: DistState, *, mixed_precision: bool, strategy: str = "full",
                 cpu_offload: bool = False, mesh=None) -> nn.Module:
    """`fully_shard` each transformer block, then the root (in place; parameters become DTensors).

    bf16 parameters with fp32 gradient reduction when `mixed_precision` on CUDA (fp32 on CPU/gloo, which has no
    bf16 reductions). Forward inputs are never cast: timesteps must reach the sinusoid in full precision.
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    kwargs = _fsdp_kwargs(state, mixed_precision, strategy, cpu_offload, mesh)
    if not cpu_offload and state.device.type == "cuda":
        module.to(state.device)
    for block in transformer_blocks(module):
        fully_shard(block, **kwargs)
    fully_shard(module, **kwargs)
    # FSDP gathers the root's parameters in hooks around `forward`; the model's other modes need the same.
    for name in getattr(module, "entry_points", ()):
        register_fsdp_forward_method(module, name)
    return module


def _is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(module, FSDPModule)


def uses_fsdp(cfg: Any, state: DistState) -> bool:
    """Whether the networks are wrapped with FSDP2: whenever a process group exists, except `no_shard` on a single
    rank, where FSDP would shard nothing and only add per-block casts and hooks (they dominated the step time of the
    small shapes-world models); such a run computes in fp32 (TF32 matmuls on GPU)."""
    return state.sharded and not (state.world_size == 1 and cfg.compute.sharding_strategy == "no_shard")


def parallelize_models(models: Any, cfg: Any, state: DistState) -> Any:
    """Move the networks of a `Models` bundle to the device and shard them when a process group exists.

    Generator and critic train (activation checkpointing per `cfg.compute.gradient_checkpointing`); the teacher is
    frozen and sharded too; SiD back-propagates through the teacher, so it is checkpointed as well. GAN heads are one
    unit. The text encoder and codec stay whole (frozen, used under no_grad); with text_encoder_cpu_offload the encoder
    stays on the CPU. Idempotent: call it again after the algorithm added modules (e.g. GAN heads).
    """
    ckpt = bool(cfg.compute.gradient_checkpointing)
    roles = {"generator": ckpt, "critic": ckpt, "teacher": ckpt and cfg.distillation.distribution_loss == "sid"}
    shard = uses_fsdp(cfg, state)
    if cfg.compute.cpu_offload and not shard:
        raise InputError("compute.cpu_offload offloads the parameters FSDP shards; this run has no FSDP (a single "
                         "process, or sharding_strategy no_shard on one rank): set it false, or run under torchrun")
    mesh = _mesh(state, cfg.compute.sharding_strategy) if shard else None
    for role, checkpointing in roles.items():
        denoiser = getattr(models, role)
        if denoiser is None or _is_sharded(denoiser.model):
            continue
        net = denoiser.model
        if hasattr(net, "set_gradient_checkpointing"):
            # SiD's checkpointed teacher recomputes its attention: kept outputs of a 14B teacher would be ~13 GB.
            keep = cfg.compute.checkpoint_keeps_attention and role != "teacher"
            net.set_gradient_checkpointing(checkpointing, keep_self_attention=keep)
        if shard:
            shard_module(net, state, mixed_precision=cfg.compute.mixed_precision,
                         strategy=cfg.compute.sharding_strategy, cpu_offload=cfg.compute.cpu_offload, mesh=mesh)
        else:
            net.to(state.device)
    heads = models.discriminator_heads
    if heads is not None and not _is_sharded(heads):
        heads.to(state.device)
        if shard:  # one unit, with the critic's precision policy (its inputs are the critic's activations)
            from torch.distributed.fsdp import fully_shard
            compute = cfg.compute
            fully_shard(heads, **_fsdp_kwargs(state, compute.mixed_precision, compute.sharding_strategy,
                                              compute.cpu_offload, mesh))
    # What the networks compute in: algorithms size KV caches and noise with it (the sharded fp32 master
    # parameters they can see outside forward would say float32).
    bf16 = cfg.compute.mixed_precision and state.device.type == "cuda" and shard
    models.extra["compute_dtype"] = torch.bfloat16 if bf16 else torch.float32
    # Without FSDP's precision policy, mixed precision is autocast around the losses (fp32 weights and caches,
    # bf16 matmuls and flash attention: fp32 attention dominated the small shapes-world steps).
    unsharded_bf16 = cfg.compute.mixed_precision and state.device.type == "cuda" and not shard
    models.extra["autocast_dtype"] = torch.bfloat16 if unsharded_bf16 else None
    if hasattr(models.text, "place"):
        models.text.place(state.device, keep_on_cpu=cfg.compute.text_encoder_cpu_offload)
        if cfg.compute.text_encoder_cpu_offload and state.device.type == "cuda":
            # torchrun sets OMP_NUM_THREADS=1 for every rank: one thread makes a UMT5-XXL encoding minutes long.
            torch.set_num_threads(max(torch.get_num_threads(), host_threads(state.local_world_size)))
    if isinstance(models.codec, nn.Module):
        models.codec.to(state.device)
    return models


# ------------------------------------------------------------------------------------------- tensors and grads

def local_tensor(t: Tensor) -> Tensor:
    """The shard this rank holds (the tensor itself when not a DTensor)."""
    return t.to_local() if isinstance(t, DTensor) else t


def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor on every rank (a collective for DTensors)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def clip_grad_norm(params: Iterable[nn.Parameter], max_norm: float) -> float:
    """Clip the global gradient norm over all ranks' shards to `max_norm`; returns the norm BEFORE clipping.

    Non-finite norms are returned without touching the gradients (the loop then skips the step).
    """
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return 0.0
    total = torch.nn.utils.get_total_norm([p.grad for p in with_grad], norm_type=2.0)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    norm = float(total)
    if np.isfinite(norm) and max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(with_grad, max_norm, total)
    return norm


def all_finite(params: Iterable[Tensor]) -> bool:
    """True when every element of every (local shard of a) tensor is finite, on every rank."""
    local = [bool(torch.isfinite(local_tensor(p.detach())).all()) for p in params]
    return not any_rank(not all(local))


# ------------------------------------------------------------------------------------ full state dicts (I/O)

def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(**kw)


def full_model_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """The unsharded state dict on rank 0's CPU (empty on other ranks); a collective when sharded."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    if not dist.is_initialized():
        return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
    return get_model_state_dict(module, options=_options(full_state_dict=True, cpu_offload=True))


def load_full_model_state_dict(module: nn.Module, sd: dict[str, Tensor], strict: bool = True) -> None:
    """Load a full state dict (needed on rank 0 only) into a possibly sharded module."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    if not dist.is_initialized():
        module.load_state_dict(sd, strict=strict)
        return
    set_model_state_dict(module, sd, options=_options(full_state_dict=True, broadcast_from_rank0=True,
                                                      strict=strict))


def full_optimizer_state_dict(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Optimizer state keyed by parameter names, unsharded, on rank 0's CPU (a collective when sharded).

    Name-keyed full state loads into any world size, so a run can resume on a different number of GPUs.
    """
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer, options=_options(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state_dict(module: nn.Module, optimizer: torch.optim.Optimizer,
                                   osd: dict[str, Any]) -> None:
    """Parameters without saved state never received a gradient (e.g. a critic's unused flow head under GAN): they
    start fresh, as they would have. State for names the module does not have is an error."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    names = {name for name, _ in module.named_parameters()}
    unknown = sorted(set(osd.get("state", {})) - names)
    if unknown:
        raise InputKeyError(f"optimizer state names {len(unknown)} parameter(s) the model does not have, e.g. "
                       f"{unknown[:5]}")
    opts = _options(full_state_dict=True, broadcast_from_rank0=dist.is_initialized(), strict=False)
    set_optimizer_state_dict(module, optimizer, osd, options=opts)
