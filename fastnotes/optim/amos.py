"""Amos (Tian & Parikh 2022) as a torch optimiser with a fused step. Math: docs/amos.md.

Each tensor theta has an expected scale eta (its "model-oriented scale"), a reduced-shape second
moment v and a monotone slot b of the same small shape. One step per tensor:
    v <- beta v + (1 - beta) mean_reduced(g^2);  r = (1 - beta^t) / max(v, eps)
    gamma = lr^2 r mean(g^2) / sqrt(1 + c sqrt(lr) b);  delta = 1 / (1 + d sqrt(lr eta) b)
    theta <- theta + delta (-(gamma/2 + extra_l2) theta - lr eta sqrt(r) g);  b <- b + gamma (1 + b)
so the step is ~lr * eta per entry, the weight decay ~lr^2/2 at first, and both decay as b grows.
"""
import math

import torch

from .. import _dispatch, _distributed, _registry, reference

_OP = "Amos"
SLOT_RULES = ("row", "column", "scalar", "full")
_FLOAT32_TINY = 2.0 ** -126


def _slot_shape(rule, param):
    """The slot shape of `param` under `rule` (see Amos). 0-d and 1-d tensors get one scalar slot
    under "row" and "column"."""
    shape = tuple(param.shape)
    if callable(rule):
        slot = tuple(int(s) for s in rule(param))
    elif rule == "full":
        slot = shape
    elif rule == "scalar" or len(shape) < 2:
        slot = ()
    elif rule == "row":
        slot = (shape[0],) + (1,) * (len(shape) - 1)
    else:  # column
        slot = (1,) * (len(shape) - 1) + (shape[-1],)
    try:
        reference.amos.reduced_axes(shape, slot)
    except ValueError as exc:
        raise ValueError(f"{_OP}: slot: {exc}") from None
    return slot


def kernel_layout(param_shape, slot_shape):
    """(outer, reduced, inner): the tensor as a row-major 3-D array with one slot per (outer,
    inner) pair and the reduction over the middle axis, or None when the reduced axes (ignoring
    axes of size 1) do not form one contiguous run."""
    axes = reference.amos.reduced_axes(param_shape, slot_shape)
    kinds = [("r" if a in axes else "k", n) for a, n in enumerate(param_shape) if n != 1]
    pattern = "".join(k for k, _ in kinds)
    first, last = pattern.find("r"), pattern.rfind("r")
    if first >= 0 and "k" in pattern[first:last]:
        return None
    if first < 0:  # one slot per entry
        return (1, 1, math.prod(n for _, n in kinds))
    sizes = [n for _, n in kinds]
    return (math.prod(sizes[:first]), math.prod(sizes[first:last + 1]), math.prod(sizes[last + 1:]))


def default_eta(param):
    """Su's and Amos's rule for the expected scale: the RMS of a matrix (or higher-order) tensor
    at construction, i.e. its init std (sqrt(1/fan_in) when it starts at zero); 0.5 for vectors and
    scalars (zero-init biases, LayerNorm gains that start at 1)."""
    if param.dim() < 2:
        return 0.5
    rms = float(param.detach().double().pow(2).mean().sqrt()) if param.numel() else 0.0
    return rms if rms > 0 else math.sqrt(1 / max(1, math.prod(param.shape[1:])))


def _check_number(name, value, low=None, high=None, low_open=False, high_open=False, none_ok=False):
    if value is None and none_ok:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{_OP}: {name} must be a finite number, got {value!r}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{_OP}: {name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ValueError(f"{_OP}: {name} must be {'<' if high_open else '<='} {high}, got {value!r}")


def _check_group(group):
    _check_number("lr", group["lr"], 0.0, low_open=True)
    _check_number("beta", group["beta"], 0.0, 1.0, high_open=True)
    _check_number("momentum", group["momentum"], 0.0, 1.0, high_open=True, none_ok=True)
    _check_number("clip_value", group["clip_value"], 0.0, low_open=True, none_ok=True)
    _check_number("extra_l2", group["extra_l2"], 0.0)
    _check_number("c_coef", group["c_coef"], 0.0)
    _check_number("d_coef", group["d_coef"], 0.0)
    # float32 state holds epsilon as a normal number (below it, a zero v divides by zero)
    _check_number("epsilon", group["epsilon"], _FLOAT32_TINY)
    eta = group["eta"]
    if eta is not None and not callable(eta):
        _check_number("eta", eta, 0.0, low_open=True)
    slot = group["slot"]
    if not callable(slot) and slot not in SLOT_RULES:
        raise ValueError(f"{_OP}: slot must be one of {SLOT_RULES} or a callable param -> shape, got {slot!r}")


class Amos(torch.optim.Optimizer):
    """Amos with a fused step: Numba on CPU, Triton on CUDA, the plain-torch reference otherwise.

    Args:
        params: tensors or parameter groups (each group may override any keyword below).
        lr: the global learning rate xi (jestimator's `learning_rate`; about 1/sqrt(number of
            training batches)). It also drives the decay factors. Warm-up: a torch LR scheduler.
        eta: expected scale of each tensor's entries: None (default_eta: RMS at construction for
            matrices, 0.5 for vectors), a number for the whole group, or a callable param -> number.
            Measured once, when the tensor is added, and kept in the state.
        slot: shape of v and b: "row" (default: one slot per entry of the first axis, averaged over
            the rest, i.e. per output unit of nn.Linear/Conv, per token of nn.Embedding), "column"
            (per entry of the last axis), "scalar" (one per tensor), "full" (no reduction), or a
            callable param -> shape with 1 on each reduced axis. Vectors get one scalar slot.
        beta: EMA rate of the squared gradient (0.999). c_coef, d_coef: decay coefficients (0.25).
        momentum: EMA of the update (not debiased; None = no momentum slot).
        clip_value: clip the gradient to [-clip_value, clip_value] first (None = no clip).
        extra_l2: extra L2 decay (0). epsilon: guard on v (2^-125; at least 2^-126, the smallest
            normal float32).

    State per tensor (fp32; fp64 for fp64 tensors): step (count), v and b of the slot shape, m
    with momentum, and eta. With GradScaler, scaler.step(opt) skips the step on inf/NaN gradients.
    Any finite gradient gives a finite step, however large (squares that would overflow are taken
    scaled by the slot's largest |g|); v saturates at the state dtype's largest value. Empty tensors
    step as no-ops.

    FSDP2 (DTensor parameters sharded on dim 0, uneven allowed) and DDP work as they are: each rank
    steps its shard; row and full slots are sharded with the matrix, the other slots sum their
    partial squares with one all_reduce per process group, so every slot (and the default eta, the
    global RMS) equals the single-process value. Other placements raise NotImplementedError.
    """

    def __init__(self, params, lr, *, eta=None, slot="row", beta=0.999, momentum=None, clip_value=None,
                 extra_l2=0.0, c_coef=0.25, d_coef=0.25, epsilon=2.0 ** -125):
        defaults = {"lr": lr, "eta": eta, "slot": slot, "beta": beta, "momentum": momentum, "clip_value": clip_value,
                    "extra_l2": extra_l2, "c_coef": c_coef, "d_coef": d_coef, "epsilon": epsilon}
        _check_group(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_group(group)
        for p in group["params"]:
            if not p.is_floating_point():
                raise TypeError(f"{_OP}: parameters must be floating point, got {p.dtype}")
            if _distributed.is_dtensor(p):
                _distributed.dim0_shard_group(_OP, "a parameter", p)  # supported placements only
        etas = _dtensor_default_etas(group["params"]) if group["eta"] is None else {}
        for p in group["params"]:
            self._init_state(p, group, etas.get(p))

    def _init_state(self, p, group, eta=None):
        if eta is None:
            eta = group["eta"]
            eta = default_eta(p) if eta is None else (eta(p) if callable(eta) else eta)
        _check_number("eta", eta, 0.0, low_open=True)
        dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
        slot = _slot_shape(group["slot"], p)
        state = self.state[p]
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        state["eta"] = float(eta)
        if _distributed.is_dtensor(p):
            # slots that follow dim 0 are sharded like p (FSDP2), the others are replicated
            follows = _slot_follows_dim0(p, slot) and _distributed.dim0_shard_group(_OP, "a parameter", p) is not None
            local_slot = (p.to_local().shape[0],) + slot[1:] if follows else slot
            for key in ("v", "b"):
                zeros = torch.zeros(local_slot, dtype=dtype, device=p.device)
                state[key] = _distributed.like_dtensor(zeros, p, follows)
        else:
            state["v"] = torch.zeros(slot, dtype=dtype, device=p.device)
            state["b"] = torch.zeros(slot, dtype=dtype, device=p.device)
        if group["momentum"] is not None:
            state["m"] = _zeros_momentum(p, dtype)

    def load_state_dict(self, state_dict):
        # torch casts floating state to the parameter dtype; Amos keeps fp32 slots for fp16/bf16 tensors
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(saved_ids, params):
            for key, value in state_dict["state"].get(i, {}).items():
                if isinstance(value, torch.Tensor):
                    value = value.to(device=p.device).clone()
                    if key in ("v", "b", "m") and _distributed.is_dtensor(p) and not _distributed.is_dtensor(value):
                        value = _slot_as_dtensor(value, p, key == "m")
                    self.state[p][key] = value

    @_dispatch.eager_op
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if any(p.grad is not None and p.grad.is_sparse for g in self.param_groups for p in g["params"]):
            raise TypeError(f"{_OP}: sparse gradients are not supported")
        for group in self.param_groups:
            batches = {}  # backend -> the group's tensors it steps in one multi-tensor call
            reduced = {}  # process group -> [(p, partial sums)]: slots reduced across dim-0 shards
            for p in group["params"]:
                if p.grad is None:
                    continue
                shard_group = self._check_distributed(p)
                state = self.state[p]
                if group["momentum"] is not None and "m" not in state:  # momentum switched on later
                    state["m"] = _zeros_momentum(p, state["v"].dtype)
                if shard_group is not None and not _slot_follows_dim0(p, tuple(state["v"].shape)):
                    state["step"] += 1
                    if p.numel():
                        reduced.setdefault(shard_group, []).append((p, _partial_sum_sq(p, state, group)))
                    continue
                backend, item = self._prepare(p, group)
                if item[0].numel() == 0:  # counted, nothing to update (an empty tensor or shard)
                    continue
                if backend == "reference":
                    _reference_step(item, group)
                else:
                    batches.setdefault(backend, []).append(item)
            for backend, items in batches.items():
                _registry.AMOS.kernels(backend).amos_step_tensors(items, _hyper(group))
            if reduced:
                _distributed.all_reduce_sum({pg: [sums for _, sums in pairs] for pg, pairs in reduced.items()})
                for pairs in reduced.values():
                    for p, sums in pairs:
                        _reduced_slot_step(p, sums, self.state[p], group)
        return loss

    def _check_distributed(self, p):
        """The dim-0 shard group of a DTensor parameter (None: not sharded, or not a DTensor)."""
        if not _distributed.is_dtensor(p):
            return None
        if not _distributed.is_dtensor(p.grad):
            raise TypeError(f"{_OP}: a DTensor parameter needs a DTensor gradient, got {type(p.grad).__name__}")
        if p.grad.placements != p.placements:
            raise NotImplementedError(f"{_OP}: gradient placements {tuple(p.grad.placements)} differ from the "
                                      f"parameter's {tuple(p.placements)}")
        return _distributed.dim0_shard_group(_OP, "a parameter", p)

    def _prepare(self, p, group):
        """Pick the backend for p (its local shard for a DTensor), count the step, and return
        (backend, kernel item)."""
        state = self.state[p]
        local = _distributed.local
        p, grad, v, b = local(p), local(p.grad), local(state["v"]), local(state["b"])
        layout = kernel_layout(p.shape, v.shape)

        def why_not(backend):
            if backend == "reference":
                return None
            if layout is None:
                return "the reduced axes of the slot are not one contiguous run"
            return _dispatch.kernel_reason(_registry.AMOS, backend, p, "parameters", dtype=p.dtype)

        backend = _dispatch.select(_OP, p.device.type, why_not)
        state["step"] += 1
        momentum_slot = local(state["m"]) if group["momentum"] is not None else None
        return backend, (p, grad, momentum_slot, v, b, state["step"], layout, state["eta"])


def _hyper(group, state=None):
    """The group's hyper-parameters for the kernels (with the tensor's eta when a state is given)."""
    hyper = {"lr": group["lr"], "beta": group["beta"], "momentum": group["momentum"], "clip_value": group["clip_value"],
                 "extra_l2": group["extra_l2"], "c_coef": group["c_coef"], "d_coef": group["d_coef"], "epsilon": group["epsilon"]}
    if state is not None:
        hyper["eta"] = state["eta"]
    return hyper


def _reference_step(item, group):
    """The plain-torch update of one kernel item in the state dtype, written back into the
    parameter (and the slots)."""
    p, grad, m_slot, v_slot, b_slot, step, _, eta = item
    dtype = v_slot.dtype
    hyper = dict(_hyper(group), eta=eta)
    new_p, v, b, m = reference.amos.amos_update(
        p.detach().to(dtype), grad, v_slot, b_slot, float(step), m=m_slot, **hyper)
    if hyper["momentum"] is None:
        m = None
    p.copy_(new_p)
    v_slot.copy_(v)
    b_slot.copy_(b)
    if m is not None:
        m_slot.copy_(m)


# -- DTensor parameters (FSDP2: dim-0 shards, possibly uneven) ----------------------------------
# A slot that keeps dim 0 (row, full) is sharded like its parameter: each rank steps its shard with
# the fused kernels, no communication. A slot that averages over dim 0 (column, scalar, vectors,
# callables that reduce dim 0) is replicated: each rank sums its shard's squares, one all_reduce per
# process group packs the sums of all such tensors of a parameter group, and every rank then
# updates the (small) slot identically and applies it to its shard.

def _slot_follows_dim0(p, slot):
    """Whether the slot keeps dim 0 of p (so it can be sharded with p along dim 0)."""
    return p.dim() > 0 and len(slot) == p.dim() and 0 not in reference.amos.reduced_axes(p.shape, slot)


def _slot_as_dtensor(value, p, is_momentum):
    """A full slot (e.g. from a one-process state dict that torch.distributed.checkpoint hands over
    as a plain tensor) laid out as _init_state lays it out for the DTensor p: sharded with p when it
    follows dim 0, else replicated."""
    from torch.distributed.tensor import distribute_tensor
    follows = is_momentum or _slot_follows_dim0(p, tuple(value.shape))
    if follows and _distributed.dim0_shard_group(_OP, "a parameter", p) is not None:
        return distribute_tensor(value, p.device_mesh, p.placements)  # FSDP2's chunks of dim 0
    return _distributed.like_dtensor(value, p, False)


def _zeros_momentum(p, dtype):
    if not _distributed.is_dtensor(p):
        return torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)
    from torch.distributed.tensor import Shard
    zeros = torch.zeros(p.to_local().shape, dtype=dtype, device=p.device)
    sharded = any(isinstance(pl, Shard) for pl in p.placements)
    return _distributed.like_dtensor(zeros, p, sharded)


def _dtensor_default_etas(params):
    """default_eta of the DTensor matrices among `params`: the global RMS, from local sums of
    squares reduced with one all_reduce per process group. {param: eta}."""
    sums, etas = {}, {}
    for p in params:
        if not _distributed.is_dtensor(p) or p.dim() < 2 or p.numel() == 0:
            continue
        group = _distributed.dim0_shard_group(_OP, "a parameter", p)
        local_sum = p.to_local().detach().double().pow(2).sum().reshape(1)
        sums.setdefault(group, []).append((p, local_sum))
    _distributed.all_reduce_sum({g: [s for _, s in pairs] for g, pairs in sums.items() if g is not None})
    for pairs in sums.values():
        for p, total in pairs:
            rms = math.sqrt(float(total) / p.numel())
            etas[p] = rms if rms > 0 else math.sqrt(1 / max(1, math.prod(p.shape[1:])))
    return etas


def _partial_sum_sq(p, state, group):
    """This rank's sums of the clipped g^2 over the slot's reduced axes, in float64, slot-shaped."""
    g = p.grad.to_local().detach().to(torch.float64)
    if group["clip_value"] is not None:
        g = g.clamp(-group["clip_value"], group["clip_value"])
    axes = reference.amos.reduced_axes(p.shape, tuple(state["v"].shape))
    return (g * g).sum(dim=axes, keepdim=True).reshape(state["v"].shape)


def _reduced_slot_step(p, sums, state, group):
    """The step of a DTensor parameter whose slot averages over its dim-0 shards, from the global
    sums of squares: the slot update (as in the kernels, in float64) on every rank, then the apply to
    the local shard in the state dtype."""
    v_slot, b_slot = state["v"].to_local(), state["b"].to_local()
    dtype = v_slot.dtype
    count = math.prod(p.shape[a] for a in reference.amos.reduced_axes(p.shape, tuple(v_slot.shape)))
    if dtype == torch.float64 and not bool(torch.isfinite(sums).all()):  # same sums on every rank
        raise OverflowError(f"{_OP}: the sum of squared gradients of a sharded float64 parameter "
                            "overflows; clip the gradients (clip_value)")
    lr, eta, beta, eps = group["lr"], state["eta"], group["beta"], group["epsilon"]
    bias = 1 - beta ** float(state["step"])
    g2 = sums / count
    v, b = v_slot.to(torch.float64), b_slot.to(torch.float64)
    u = beta * v + (1 - beta) * g2
    guarded = u.clamp_min(eps)
    gamma = lr * lr * bias * (g2 / guarded) / torch.sqrt(1 + group["c_coef"] * math.sqrt(lr) * b)
    delta = 1 / (1 + group["d_coef"] * math.sqrt(lr * eta) * b)
    decay = (delta * (gamma / 2 + group["extra_l2"])).to(dtype)
    scale = (delta * lr * eta * torch.sqrt(bias / guarded)).to(dtype)
    v_slot.copy_(u.clamp_max(torch.finfo(dtype).max))
    b_slot.copy_(b + gamma * (1 + b))
    local_p = p.to_local()
    if local_p.numel() == 0:
        return
    theta = local_p.detach().to(dtype)
    g = p.grad.to_local().to(dtype)
    if group["clip_value"] is not None:
        g = g.clamp(-group["clip_value"], group["clip_value"])
    update = -decay * theta - scale * g
    if group["momentum"] is not None:
        m = state["m"].to_local()
        m.mul_(group["momentum"]).add_(update, alpha=1 - group["momentum"])
        update = m
    local_p.copy_(theta + update)
