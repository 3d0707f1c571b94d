"""torch.distributed helpers shared by the ops (../shared/DESIGN.md, "Multiple devices").

Everything here is torch.distributed itself: DTensor parameters from FSDP2 (`fully_shard`, dim-0
shards, possibly uneven) and process groups. Nothing is imported from torch.distributed until a
DTensor is actually seen, so single-process use pays nothing.
"""
import torch


def is_dtensor(tensor):
    """Whether `tensor` is a torch.distributed DTensor (False where torch.distributed is missing)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor
    return isinstance(tensor, DTensor)


def dim0_shard_group(op, name, tensor):
    """The process group a DTensor is sharded over along dim 0, or None when it is replicated on
    every mesh dimension (its local tensor is then the whole tensor). Placements other than
    Replicate and one Shard(0) raise NotImplementedError naming `name`."""
    from torch.distributed.tensor import Replicate, Shard
    shard_dims = []
    for mesh_dim, placement in enumerate(tensor.placements):
        if isinstance(placement, Shard) and placement.dim == 0:
            shard_dims.append(mesh_dim)
        elif not isinstance(placement, Replicate):
            raise NotImplementedError(
                f"{op}: {name} is a DTensor with placements {tuple(tensor.placements)}; only dim-0 shards "
                "(FSDP2's Shard(0)) on one mesh dimension and Replicate are supported")
    if len(shard_dims) > 1:
        raise NotImplementedError(
            f"{op}: {name} is a DTensor sharded along dim 0 on {len(shard_dims)} mesh dimensions "
            f"{tuple(tensor.placements)}; only one Shard(0) mesh dimension is supported")
    if not shard_dims or tensor.device_mesh.size(shard_dims[0]) == 1:
        return None
    return tensor.device_mesh.get_group(shard_dims[0])


def like_dtensor(local, reference, sharded):
    """`local` wrapped as a DTensor on `reference`'s mesh: with `reference`'s placements and its
    global dim 0 when `sharded` (a dim-0 shard of a tensor whose other dims are local's), else
    replicated on every mesh dimension."""
    from torch.distributed.tensor import DTensor, Replicate
    mesh = reference.device_mesh
    if not sharded:
        return DTensor.from_local(local, mesh, [Replicate()] * mesh.ndim, run_check=False)
    shape = (reference.shape[0],) + tuple(local.shape[1:])
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, mesh, reference.placements, run_check=False, shape=shape, stride=stride)


def local(tensor):
    """The local tensor of a DTensor; other tensors as they are."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def all_reduce_sum(tensors_by_group):
    """Sum float tensors across their process groups in place: one all_reduce per group (the
    tensors of a group are packed into one float64 buffer). `tensors_by_group`: {group: [tensors]}."""
    for group, tensors in tensors_by_group.items():
        if not tensors:
            continue
        flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM, group=group)
        offset = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view(t.shape))
            offset += n


def check_group(op, group):
    """Raise (locally, before any collective) unless `group` is a torch.distributed ProcessGroup of
    an initialised default group that this rank belongs to. Returns (rank in group, group size)."""
    dist = torch.distributed
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{op}: group= needs torch.distributed initialised (init_process_group) first")
    if group is dist.GroupMember.NON_GROUP_MEMBER:  # what new_group returns on the ranks it leaves out
        raise ValueError(f"{op}: group= does not contain this rank (global rank {dist.get_rank()})")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{op}: group must be a torch.distributed ProcessGroup or None, got {type(group).__name__}")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"{op}: group= does not contain this rank (global rank {dist.get_rank()})")
    return rank, dist.get_world_size(group)


def gather_checked(op, group, error, value):
    """All-gather (error, value) over `group` (one all_gather_object) and return the values in group
    rank order. When any rank brings an exception, every rank raises the same one: the lowest such
    rank's message, as ValueError / TypeError (RuntimeError for other kinds), naming that rank. This is how
    a rank-local validation failure becomes the same error everywhere instead of a hang."""
    payload = None if error is None else (type(error).__name__, str(error))
    gathered = [None] * torch.distributed.get_world_size(group)
    torch.distributed.all_gather_object(gathered, (payload, value), group=group)
    for rank, (bad, _) in enumerate(gathered):
        if bad is not None:
            kind = {"ValueError": ValueError, "TypeError": TypeError}.get(bad[0], RuntimeError)
            message = bad[1] if bad[1].startswith(op) else f"{op}: {bad[1]}"
            raise kind(f"{message} (raised on rank {rank} of the group)")
    return [v for _, v in gathered]


def all_gather_rows(tensor, counts, group):
    """Every rank's rows [n_r, ...] concatenated in group rank order, [sum(counts), ...]; `counts`
    holds every rank's n_r (agreed beforehand). Uneven counts are padded to the largest: one
    all-gather of world x max(counts) rows."""
    dist = torch.distributed
    world, most = len(counts), max(counts)
    rest = tuple(tensor.shape[1:])
    padded = tensor.contiguous()
    if tensor.shape[0] != most:
        padded = tensor.new_zeros((most,) + rest)
        padded[:tensor.shape[0]] = tensor
    out = tensor.new_empty((world * most,) + rest)
    # all_gather_single is the newer name (recent torch warns on all_gather_into_tensor)
    (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(out, padded, group=group)
    if all(n == most for n in counts):
        return out
    return torch.cat([out[r * most:r * most + n] for r, n in enumerate(counts)])


def reduce_scatter_rows(tensor, counts, group):
    """The sum over the group of `tensor` [sum(counts), ...] (rows in group rank order), of which
    this rank gets its own counts[rank] rows: one reduce-scatter (uneven counts padded)."""
    dist = torch.distributed
    world, most = len(counts), max(counts)
    rest = tuple(tensor.shape[1:])
    padded = tensor.contiguous()
    if any(n != most for n in counts):
        padded = tensor.new_zeros((world * most,) + rest)
        offset = 0
        for r, n in enumerate(counts):
            padded[r * most:r * most + n] = tensor[offset:offset + n]
            offset += n
    out = tensor.new_empty((most,) + rest)
    (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(
        out, padded, op=dist.ReduceOp.SUM, group=group)
    return out[:counts[dist.get_rank(group)]]
