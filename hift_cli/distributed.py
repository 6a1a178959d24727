"""Data-parallel HiFT on ``torch.distributed`` (launched by ``torchrun``).

Every rank holds the whole model and follows the same group order (shared seed). Each
rank trains on its own shard of every global batch; after backward only the *active*
group's gradients are summed across ranks, bucket by bucket as backward produces them
(post-accumulate-grad hooks launch asynchronous all-reduces while the layers below are
still back-propagating). The loss is normalised by the item count of the whole global
batch, so a sum of the ranks' gradients is exactly the single-process gradient of that
batch, and the optimizer step that follows is identical everywhere. Frozen groups never
have gradients, so a step moves ~1/k of full fine-tuning's gradient bytes.

Plain DDP does not fit: it builds its buckets once, for the parameters that require grad
when it wraps the model, and HiFT changes that set every step.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os

import torch
import torch.distributed as dist

BUCKET_BYTES = 25 * 2**20  # DDP's default bucket size


@dataclasses.dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """Started by torchrun (or another launcher that sets WORLD_SIZE) with >1 process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init() -> Dist:
    """Join the process group described by torchrun's environment (idempotent)."""
    if not launched():
        return Dist()
    if not dist.is_initialized():
        # NCCL moves CUDA tensors; gloo carries CPU tensors (the run-dir name, RNG states).
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=dt.timedelta(minutes=60))
    return current()


def current() -> Dist:
    if not (dist.is_available() and dist.is_initialized()):
        return Dist()
    return Dist(dist.get_rank(), dist.get_world_size(),
                int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if current().enabled:
        dist.barrier()


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank."""
    if not current().enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not current().enabled:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_(tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if current().enabled:
        dist.all_reduce(tensor, op=op)
    return tensor


def broadcast_parameters(model: torch.nn.Module) -> None:
    """Rank 0's weights everywhere (as DDP does when it wraps a model)."""
    if not current().enabled:
        return
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)


class _Bucket:
    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = params
        self.pending = len(params)
        self.launched = False


class GradSync:
    """Sums the active group's gradients across ranks, overlapped with backward.

    ``attach(params)`` on every group switch; ``arm(True)`` before the backward pass of a
    window's last micro-batch (earlier ones accumulate locally, as DDP's ``no_sync``);
    ``finish()`` after it: waits, writes the sums back, returns the bytes all-reduced.
    """

    def __init__(self, bucket_bytes: int = BUCKET_BYTES):
        self.bucket_bytes = bucket_bytes
        self.buckets: list[_Bucket] = []
        self.bucket_of: dict[int, _Bucket] = {}
        self.handles: list = []
        self.inflight: list[tuple[_Bucket, torch.Tensor, object]] = []
        self.armed = False

    def attach(self, params: list[torch.nn.Parameter]) -> None:
        for h in self.handles:
            h.remove()
        self.handles, self.buckets, self.bucket_of = [], [], {}
        # Gradients arrive roughly in reverse forward order: bucket them that way so the
        # first bucket fills (and goes on the wire) while backward is still running.
        current: list = []
        size = 0
        unique = list({id(p): p for p in params}.values())  # tied weights: once
        for p in reversed(unique):
            if current and (size + p.numel() * p.element_size() > self.bucket_bytes
                            or p.dtype != current[0].dtype):
                self.buckets.append(_Bucket(current))
                current, size = [], 0
            current.append(p)
            size += p.numel() * p.element_size()
        if current:
            self.buckets.append(_Bucket(current))
        for bucket in self.buckets:
            for p in bucket.params:
                self.bucket_of[id(p)] = bucket
                self.handles.append(p.register_post_accumulate_grad_hook(self._ready))

    def arm(self, on: bool) -> None:
        self.armed = on

    def _ready(self, p: torch.Tensor) -> None:
        if not self.armed:
            return
        bucket = self.bucket_of[id(p)]
        bucket.pending -= 1
        if bucket.pending == 0:
            self._launch(bucket)

    def _launch(self, bucket: _Bucket) -> None:
        # Parameters the graph did not reach have no gradient, on every rank alike
        # (same model, same group): leave them out.
        grads = [p.grad for p in bucket.params if p.grad is not None]
        bucket.launched = True
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        self.inflight.append((bucket, flat, dist.all_reduce(flat, async_op=True)))

    def finish(self, scale: float = 1.0) -> int:
        """``scale``: applied to the sums (``1 / world``: DDP's mean)."""
        for bucket in self.buckets:
            if not bucket.launched:
                self._launch(bucket)
        moved = 0
        for bucket, flat, work in self.inflight:
            work.wait()
            if scale != 1.0:
                flat.mul_(scale)
            offset = 0
            for p in bucket.params:
                if p.grad is not None:
                    n = p.grad.numel()
                    p.grad.copy_(flat[offset: offset + n].view_as(p.grad))
                    offset += n
            moved += flat.numel() * flat.element_size()
        self.inflight = []
        for bucket in self.buckets:
            bucket.pending, bucket.launched = len(bucket.params), False
        self.armed = False
        return moved

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


# ---------------------------------------------------------------- sharded weights (FSDP2)
def shard_model(model: torch.nn.Module, blocks, device: torch.device) -> None:
    """``trainer.shard_weights``: FSDP2 over all processes, with the weights read by rank
    0 alone: the other ranks pass the same model built on the meta device, and each rank
    receives its shards from rank 0 (so a node holds one full copy in host memory, not
    one per process). Each block (a unit) is its own ``fully_shard`` group, all-gathered
    just before it runs and freed after; the root takes the rest (embeddings, final norm,
    head: tied weights stay together). Gradients are reduce-scattered as a *sum*: the
    engine already weights each micro-batch's loss by its share of the global batch, so
    FSDP's default average would divide twice."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    # Rank 0's weights before sharding: detached aliases of the loaded (CPU) storage,
    # which moving the parameters to the device does not touch.
    full = {n: p.detach() for n, p in model.named_parameters()} if dist.get_rank() == 0 else {}
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM)
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank != 0:
        model.to_empty(device=device)
    with torch.no_grad():  # one weight at a time: rank 0's, each rank keeps its rows
        for name, p in model.named_parameters():
            mine = p._local_tensor
            t = (full[name].to(mine.device) if rank == 0
                 else torch.empty(p.shape, dtype=p.dtype, device=mine.device))
            dist.broadcast(t, src=0)
            start = min(rank * -(-p.shape[0] // world), p.shape[0])
            mine.copy_(t[start: start + mine.shape[0]])
        for buffer in model.buffers():  # rotary frequencies and the like
            dist.broadcast(buffer, src=0)


def reshard(model: torch.nn.Module) -> None:
    """Free every gathered unit, so that the model's parameters are the shards again.
    The root stays gathered after a forward pass without backward (evaluation), and FSDP2
    copies ``requires_grad`` onto a unit's gathered parameters only when it gathers them:
    reshard before reading the parameters and before the active group changes."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded tensor (the tensor itself if it is not sharded)."""
    return t._local_tensor if is_sharded(t) else t


def rebind_local(t: torch.Tensor, storage: torch.Tensor) -> None:
    """Point a sharded tensor's local part at ``storage`` (same shape and dtype, or a
    poison tensor): how the offload store moves sharded state without rewrapping it."""
    t._local_tensor = storage


def wrap_like(part: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This rank's ``part`` of a tensor sharded like ``param`` (e.g. Adam's moments)."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(part, param.device_mesh, param.placements, run_check=False,
                              shape=param.shape, stride=param.stride())


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights, gathered on rank 0's CPU (collective: every rank calls
    it; the others get an empty dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))
