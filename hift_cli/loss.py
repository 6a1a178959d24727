"""The causal-LM loss over chunks of tokens: no ``[tokens, vocab]`` logits kept for backward.

A 128k-token vocabulary makes the logits of 8 x 512 tokens 2 GiB in fp32, and the plain
loss keeps them (or their log-softmax) until backward. :class:`ChunkedLoss` computes the
same mean cross-entropy a chunk of tokens at a time and, where something needs a gradient,
the gradients of the hidden states and of the head right away (as Liger's fused linear
cross-entropy does), so backward holds only the hidden states' gradient. Tokens without a
target (prompt, padding) are skipped: no head compute for them.

The model is left as it is: inside :meth:`ChunkedLoss.active`, hooks on the LM head hand
it an empty input and the model's own ``loss_function`` is replaced for the duration.
A model that changes the logits between head and loss (Gemma-2's soft-capping, a logit
scale) is detected (the logits the loss receives are not the head's) and keeps the plain
loss (:func:`chunkable`).

Sub-units of the head (``head.1``: vocabulary rows a..b) get a gradient for their rows
only: ``rows`` maps the head weight to the row ranges that train, and the weight's
gradient is then a sparse tensor of those rows instead of a dense ``[vocab, hidden]`` one.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100
# "auto" chunk length: tokens whose fp32 logits take about this many bytes.
CHUNK_BYTES = 256 * 2**20


class NotChunkable(RuntimeError):
    """The model does something with its logits before the loss: keep the plain loss."""


def chunk_tokens(setting, vocab_size: int) -> int | None:
    """Tokens per chunk for ``model.loss_chunk_tokens`` (``auto``, a number, or null: off)."""
    if setting is None:
        return None
    if setting == "auto":
        return max(1, CHUNK_BYTES // (4 * vocab_size))
    return int(setting)


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``hidden @ weight.T (+ bias)`` against ``targets``, chunk by
    chunk, with its gradients computed in the forward pass (kept on ``ctx``, so counting
    what autograd saves sees only the hidden states' gradient, an activation)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk, rows):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n = hidden.shape[0]
        if hidden.is_meta:  # no values: every token counts (the estimate's batches)
            index, count = None, n
        else:
            index = (targets != IGNORE).nonzero().squeeze(1)
            count = index.numel()
        total = torch.zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32),
                            device=hidden.device)
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = None
        if need_w:
            grad_w = (torch.zeros_like(weight) if rows is None else
                      [weight.new_zeros((b - a, *weight.shape[1:])) for a, b in rows])
        grad_b = torch.zeros_like(bias) if need_b else None
        for start in range(0, count, chunk):
            if index is None:
                sel, h, t = None, hidden[start:start + chunk], targets[start:start + chunk]
            else:
                sel = index[start:start + chunk]
                h, t = hidden.index_select(0, sel), targets.index_select(0, sel)
            logits = F.linear(h, weight, bias)
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if not (need_h or need_w or need_b):
                continue
            # d(mean loss)/d(logits) = (softmax - one_hot) / count, in place of the logits.
            g = logits.sub_(lse[:, None]).exp_()
            g[torch.arange(len(t), device=g.device), t] -= 1.0
            g = g.div_(max(count, 1)).to(h.dtype)
            if need_h:
                part = (g @ weight).to(grad_h.dtype)
                if sel is None:
                    grad_h[start:start + chunk] = part
                else:
                    grad_h.index_copy_(0, sel, part)
            if need_w and rows is None:
                grad_w.addmm_(g.t().to(grad_w.dtype), h.to(grad_w.dtype))
            elif need_w:
                for (a, b), buf in zip(rows, grad_w):
                    buf.addmm_(g[:, a:b].t().to(buf.dtype), h.to(buf.dtype))
            if need_b:
                grad_b += g.sum(0).to(grad_b.dtype)
        ctx.save_for_backward(*([grad_h] if need_h else []))
        ctx.head_grads = (grad_w, grad_b, rows, weight.shape)
        return total / max(count, 1)

    @staticmethod
    def backward(ctx, grad_out):
        grad_h = ctx.saved_tensors[0] * grad_out.to(ctx.saved_tensors[0].dtype) \
            if ctx.saved_tensors else None
        grad_w, grad_b, rows, shape = ctx.head_grads
        ctx.head_grads = None
        if grad_w is not None and rows is not None:  # the trained rows only: sparse
            index = torch.cat([torch.arange(a, b, device=grad_out.device) for a, b in rows])
            values = torch.cat(grad_w).mul_(grad_out.to(grad_w[0].dtype))
            grad_w = torch.sparse_coo_tensor(index[None], values, shape, is_coalesced=True,
                                             check_invariants=False)
        elif grad_w is not None:
            grad_w.mul_(grad_out.to(grad_w.dtype))
        if grad_b is not None:
            grad_b.mul_(grad_out.to(grad_b.dtype))
        return grad_h, grad_w, grad_b, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: torch.Tensor | None = None, chunk: int = 1024,
                         rows: list[tuple[int, int]] | None = None) -> torch.Tensor:
    """Mean cross-entropy of the logits ``hidden @ weight.T + bias`` (computed in fp32 a
    ``chunk`` of tokens at a time) against ``targets`` (``-100``: ignored).

    Args:
        hidden: ``[tokens, hidden]``.
        weight: the head, ``[vocab, hidden]``.
        rows: the weight's gradient for these row ranges only (a sparse tensor); None: dense.
    """
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, max(1, int(chunk)),
                                     None if rows is None else [tuple(r) for r in rows])


class ChunkedLoss:
    """The model's causal-LM loss computed by :func:`linear_cross_entropy` inside
    :meth:`active`. ``rows`` (head weight id -> row ranges) is set by the trainer when only
    some of the head's rows train (sub-units)."""

    def __init__(self, model: nn.Module, chunk: int):
        self.model = model
        self.head = model.get_output_embeddings()
        self.chunk = chunk
        self.rows: dict[int, list[tuple[int, int]]] = {}

    @contextlib.contextmanager
    def active(self):
        head, model = self.head, self.model
        seen: dict = {}

        def before(module, args):
            if not args or not torch.is_tensor(args[0]):
                raise NotChunkable("the LM head is not called with the hidden states")
            seen["hidden"] = args[0]
            return (args[0][..., :0, :],)  # the head computes nothing

        def after(module, args, output):
            hidden = seen["hidden"]
            # Stands in for the logits: no memory (every element is the one zero).
            seen["fake"] = output.new_zeros(()).expand(*hidden.shape[:-1], output.shape[-1])
            return seen["fake"]

        def loss_function(logits, labels, vocab_size=None, num_items_in_batch=None,
                          ignore_index=IGNORE, shift_labels=None, **kwargs):
            if logits is not seen.get("fake") or ignore_index != IGNORE:
                raise NotChunkable("the model changes the logits before its loss")
            hidden = seen.pop("hidden")
            if shift_labels is None:
                shift_labels = F.pad(labels, (0, 1), value=IGNORE)[..., 1:]
            loss = linear_cross_entropy(
                hidden.reshape(-1, hidden.shape[-1]), head.weight,
                shift_labels.reshape(-1).to(hidden.device), getattr(head, "bias", None),
                self.chunk, self.rows.get(id(head.weight)))
            if num_items_in_batch is not None:  # a sum over the batch's items, as HF does
                valid = (shift_labels != IGNORE).sum()
                loss = loss * valid / num_items_in_batch
            return loss

        had = "_loss_function" in vars(model)
        previous = vars(model).get("_loss_function")
        handles = [head.register_forward_pre_hook(before), head.register_forward_hook(after)]
        model.loss_function = loss_function
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            if had:
                model.loss_function = previous
            else:
                del model._loss_function


def chunkable(model: nn.Module) -> bool:
    """Whether :class:`ChunkedLoss` computes ``model``'s own loss: a causal LM whose head is
    a plain linear layer applied to the hidden states, and whose loss receives the head's
    logits unchanged (one 2-token forward pass checks it; meta models too)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        return False
    device = head.weight.device
    ids = torch.tensor([[1, 2]], device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), ChunkedLoss(model, 1).active():
            model(input_ids=ids, labels=ids)
        return True
    except NotChunkable:
        return False
    finally:
        model.train(was_training)
