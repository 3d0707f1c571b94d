"""Autograd and autocast mechanics shared by the ops' torch.autograd.Functions."""
import contextlib
import functools

import torch


class _DifferentiatedTwice(torch.autograd.Function):
    """The identity on a gradient, recorded while a backward runs with create_graph=True; its own
    backward raises. `anchors` are tensors that require grad, so the result is part of the graph."""

    @staticmethod
    def forward(ctx, op, grad, *anchors):
        ctx.op = op
        return grad.view_as(grad)

    @staticmethod
    def backward(ctx, *unused):
        raise RuntimeError(f"{ctx.op}: its gradient cannot be differentiated again (double backward, e.g. a "
                           "gradient penalty): the backward is a fused kernel. fastnotes.use_backend('reference') "
                           "runs the plain-torch op, which supports it.")


def once_differentiable(op):
    """Decorator for a backward that a kernel computes (not differentiable itself).

    torch's once_differentiable ties the gradients to the graph only when the incoming gradient
    requires grad, so torch.autograd.grad(loss, x, create_graph=True) would return a gradient with no
    graph, and a gradient penalty built on it would silently add nothing. Here, under create_graph,
    each gradient is tied to the saved tensors that require grad, and differentiating it raises."""

    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grad_outputs):
            create_graph = torch.is_grad_enabled()
            anchors = [t for t in (*ctx.saved_tensors, *grad_outputs)
                       if isinstance(t, torch.Tensor) and t.requires_grad] if create_graph else []
            with torch.no_grad():
                grads = backward(ctx, *grad_outputs)
            if not anchors:
                return grads
            single = not isinstance(grads, tuple)
            marked = tuple(_DifferentiatedTwice.apply(op, g, *anchors) if isinstance(g, torch.Tensor) else g
                           for g in ((grads,) if single else grads))
            return marked[0] if single else marked

        return wrapper

    return decorate


AUTOCAST_CASTS = (torch.float32, torch.float16, torch.bfloat16)  # what autocast casts (never float64)


def autocast_dtype(device):
    """autocast's lower-precision dtype when autocast is on for `device`'s type, else None."""
    kind = device.type
    if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return None


def autocast_off(device):
    """A context with autocast off for `device`'s type (a no-op where it is off already)."""
    if autocast_dtype(device) is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


def loss_dtype(x):
    """The dtype a loss of `x` comes out in: x's, but float32 under autocast for float16/bfloat16 x,
    as torch's losses give."""
    if x.dtype in (torch.float16, torch.bfloat16) and autocast_dtype(x.device) is not None:
        return torch.float32
    return x.dtype
