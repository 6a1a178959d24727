"""Activations: the bytes autograd saves in a forward pass with only the active group's
parameters requiring grad, counted as the GPU kernels save them (flash attention), per
transformer block (to model gradient checkpointing)."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from hift_cli.grouping import Group, block_stack
from hift_cli.loss import ChunkedLoss
from hift_cli.memory.counting import Settings


class _FlashAttention(torch.autograd.Function):
    """Saves what flash attention saves (q, k, v as given, the output and a log-sum-exp).
    Only counted, never differentiated: on meta tensors the output is empty, on real ones
    the original kernel computes it."""

    @staticmethod
    def forward(ctx, sdpa, query, key, value, kwargs):
        out = torch.empty_like(query)
        if not query.is_meta:  # in the layout the GPU kernels return: like the query
            out.copy_(sdpa(query, key, value, **kwargs))
        lse = query.new_empty(query.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, out, lse)
        return out


class _MetaGroupedMm(torch.autograd.Function):
    """``grouped_mm`` (MoE experts) on meta tensors of any dtype: the meta kernel accepts
    only bf16 (the CUDA kernel's rule), the CPU one runs fp32 too. Saves what the real op
    saves: each operand where the other needs a gradient, and the offsets."""

    @staticmethod
    def forward(ctx, grouped_mm, mat_a, mat_b, offs, kwargs):
        shape = grouped_mm(mat_a.to(torch.bfloat16), mat_b.to(torch.bfloat16), offs=offs,
                           **kwargs).shape
        need_a, need_b = ctx.needs_input_grad[1:3]
        ctx.save_for_backward(*(t for t, keep in ((mat_a, need_b), (mat_b, need_a), (offs, True))
                                if keep and t is not None))
        return mat_a.new_empty(shape, dtype=kwargs.get("out_dtype") or mat_a.dtype)


@contextlib.contextmanager
def counting_kernels(real_attention: bool = False):
    """Run a forward pass for counting saved tensors, on meta tensors where possible.

    On meta tensors SDPA falls back to the math path, which saves the full attention
    matrix; the kernels that really run (flash / memory-efficient on CUDA, flash on CPU)
    save only q, k, v, the output and a log-sum-exp, so attention is routed to a function
    that saves exactly those (also on real tensors with ``real_attention``: the CPU sample
    of :func:`sampled_activation_bytes` must count what a GPU saves). Meta ``grouped_mm``
    gets any dtype, and transformers' padding warning, which reads token values, is skipped.
    """
    import torch.nn.functional as F
    from transformers import PreTrainedModel

    sdpa, grouped_mm = F.scaled_dot_product_attention, getattr(F, "grouped_mm", None)
    warn = PreTrainedModel.warn_if_padding_and_no_attention_mask

    def flash(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
              enable_gqa=False, **kwargs):
        kwargs.update(attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                      scale=scale, enable_gqa=enable_gqa)
        if query.is_meta or real_attention:
            return _FlashAttention.apply(sdpa, query, key, value, kwargs)
        return sdpa(query, key, value, **kwargs)

    def meta_grouped_mm(mat_a, mat_b, *, offs=None, **kwargs):
        if mat_a.is_meta and mat_a.dtype != torch.bfloat16:
            return _MetaGroupedMm.apply(grouped_mm, mat_a, mat_b, offs, kwargs)
        return grouped_mm(mat_a, mat_b, offs=offs, **kwargs)

    F.scaled_dot_product_attention = flash
    if grouped_mm is not None:
        F.grouped_mm = meta_grouped_mm
    PreTrainedModel.warn_if_padding_and_no_attention_mask = lambda *args: None
    try:
        yield
    finally:
        F.scaled_dot_product_attention = sdpa
        if grouped_mm is not None:
            F.grouped_mm = grouped_mm
        PreTrainedModel.warn_if_padding_and_no_attention_mask = warn


def activation_bytes(model: nn.Module, groups: list[Group], settings: Settings
                     ) -> list[int]:
    """Bytes autograd keeps for backward while each group is the active one."""
    blocks = list(block_stack(model)[1])
    result = []
    for group in groups:
        saved = saved_bytes(model, blocks, group.params.values(), settings.batch_size,
                             settings.seq_len, settings.causal, settings.loss_chunk)
        result.append(saved.with_checkpointing() if settings.checkpointing else saved.total)
    return result


def saved_bytes(model: nn.Module, blocks: list[nn.Module], active, batch: int, seq_len: int,
                 causal: bool, loss_chunk: int | None = None) -> "SavedBytes":
    """One training forward pass with only the ``active`` parameters requiring grad (the
    causal-LM loss chunked by ``loss_chunk`` tokens, as the engine computes it)."""
    device = next(model.parameters()).device
    # Real (sample) models get real token ids; on meta any ids will do.
    vocab = max(4, getattr(model.config, "vocab_size", None) or 4)
    ids = torch.randint(3, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(0)
                        ).to(device)
    labels = ids if causal else torch.zeros(batch, dtype=torch.long, device=device)
    active = {id(p) for p in active}
    for p in model.parameters():
        p.requires_grad_(id(p) in active)
    saved = SavedBytes(model, blocks)
    chunked = (ChunkedLoss(model, loss_chunk).active() if loss_chunk and causal
               else contextlib.nullcontext())
    try:
        with saved, counting_kernels(real_attention=not ids.is_meta), chunked:
            model(input_ids=ids, labels=labels)
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
    return saved


class SavedBytes:
    """Counts the storages autograd saves during a forward pass, once each, and which
    transformer block saved them (to model gradient checkpointing)."""

    def __init__(self, model: nn.Module, blocks: list[nn.Module]):
        self.params = {p.untyped_storage()._cdata for p in model.parameters()}
        self.blocks = blocks
        self.seen: dict[int, tuple[int, int | None]] = {}  # storage -> (bytes, block)
        self.block_inputs: dict[int, int] = {}
        self.current: int | None = None
        self._hooks = []

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in self.params and storage._cdata not in self.seen:
            self.seen[storage._cdata] = (storage.nbytes(), self.current)
        return t

    def __enter__(self) -> "SavedBytes":
        for i, block in enumerate(self.blocks):
            def pre(module, args, kwargs, i=i):
                self.current = i
                hidden = args[0] if args else kwargs.get("hidden_states")
                if torch.is_tensor(hidden):
                    self.block_inputs[i] = hidden.nbytes if hidden.requires_grad else 0

            def post(module, args, output, i=i):
                self.current = None

            self._hooks += [block.register_forward_pre_hook(pre, with_kwargs=True),
                            block.register_forward_hook(post)]
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)
        for h in self._hooks:
            h.remove()
        self._hooks = []

    @property
    def total(self) -> int:
        return sum(b for b, _ in self.seen.values())

    @property
    def outside(self) -> int:
        return sum(b for b, blk in self.seen.values() if blk is None)

    def per_block(self) -> dict[int, int]:
        per_block: dict[int, int] = {}
        for b, blk in self.seen.values():
            if blk is not None:
                per_block[blk] = per_block.get(blk, 0) + b
        return per_block

    def with_checkpointing(self) -> int:
        """Checkpointed blocks keep only their input; one block's internals come back
        at a time during backward."""
        per_block = self.per_block()
        inputs = sum(self.block_inputs.get(i, 0) for i in per_block)
        return self.outside + inputs + max(per_block.values(), default=0)


def fixed_shape_batches(batch: int, seq_len: int, vocab: int):
    """Random token ids of one fixed shape, every position a target: memory and time
    depend on the shape alone, so measurements match the estimate's assumptions."""
    g = torch.Generator().manual_seed(0)
    while True:
        ids = torch.randint(3, vocab, (batch, seq_len), generator=g)
        yield {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
