"""Where training memory goes: weights, gradients, optimizer states, fp32 masters,
activations and other, for full fine-tuning (fpft) and HiFT side by side.

``estimate`` needs no weights: the model is built on the meta device from its config,
activations are the bytes autograd saves in a meta forward pass (each storage counted
once, parameters excluded), and optimizer-state bytes come from stepping the configured
optimizer on meta tensors. ``Probe`` measures the same categories on a real run.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass

import torch
from hydra.utils import get_class
from torch import nn

from hift_cli.config import SHAPES, Config, ConfigError
from hift_cli.grouping import Group, block_stack, find_units, make_groups
from hift_cli.offload import offload_enabled, state_shapes

CATEGORIES = ("weights", "gradients", "optimizer_states", "fp32_masters", "activations",
              "other")
GIB = 2**30

@dataclass
class Settings:
    """What the accounting depends on, read off a Config."""

    weight_bytes: int  # per parameter on the device
    state_dtype: torch.dtype  # dtype of the tensors the optimizer updates
    mixed: bool  # bf16-mixed: fp32 masters and fp32 master grads
    checkpointing: bool
    batch_size: int
    seq_len: int
    causal: bool  # causal_lm: a label per token; else one per sequence

    @classmethod
    def of(cls, cfg: Config) -> "Settings":
        bf16 = cfg.model.dtype == "bfloat16"
        mixed = cfg.trainer.precision == "bf16-mixed"
        return cls(weight_bytes=2 if bf16 else 4,
                   state_dtype=torch.bfloat16 if bf16 and not mixed else torch.float32,
                   mixed=mixed,
                   checkpointing=cfg.model.gradient_checkpointing,
                   batch_size=cfg.trainer.batch_size, seq_len=cfg.memprofile.seq_len
                   or cfg.data.max_length, causal=cfg.model.task == "causal_lm")


def meta_model(cfg: Config) -> nn.Module:
    """The configured architecture on the meta device: no memory, no weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from hift_cli.models import DTYPES, load_config, resolve

    shape = cfg.memprofile.shape
    if shape:
        if shape not in SHAPES:
            raise ConfigError(f"memprofile.shape: unknown preset {shape!r}"
                              f" (one of {', '.join(SHAPES)})")
        preset = dict(SHAPES[shape])
        config = AutoConfig.for_model(preset.pop("model_type"), **preset)
    else:
        config = load_config(resolve(cfg.model.name_or_path), cfg.model.trust_remote_code)
    cls = (AutoModelForCausalLM if cfg.model.task == "causal_lm"
           else AutoModelForSequenceClassification)
    compute = torch.bfloat16 if cfg.trainer.precision != "fp32" else DTYPES[cfg.model.dtype]
    with torch.device("meta"):
        # bf16-autocast saves mostly bf16 activations: build in bf16 for the estimate.
        return cls.from_config(config, dtype=compute, trust_remote_code=cfg.model.trust_remote_code)


def optimizer_state_bytes(opt_cfg: dict, params: list[torch.Tensor],
                          dtype: torch.dtype) -> dict[int, int]:
    """Device bytes of optimizer state per parameter (keyed by ``id``).

    Steps the configured optimizer once on a meta tensor of each distinct shape, so any
    ``torch.optim`` class reports its own state. Optimizers that cannot step on meta
    tensors step on a real CPU tensor of that shape instead; bitsandbytes' 8-bit ones
    (CUDA only) use their documented layout.
    """
    kwargs = {k: v for k, v in opt_cfg.items() if k != "_target_"}
    target = opt_cfg["_target_"]
    per_shape: dict[tuple, int] = {}
    out = {}
    for p in params:
        key = tuple(p.shape)
        if key not in per_shape:
            if target.startswith("bitsandbytes.") and "8bit" in target.lower():
                per_shape[key] = _bnb_8bit_state_bytes(p.numel())
            else:
                per_shape[key] = _stepped_state_bytes(get_class(target), kwargs, key, dtype)
        out[id(p)] = per_shape[key]
    return out


def _stepped_state_bytes(cls, kwargs: dict, shape: tuple, dtype: torch.dtype) -> int:
    try:
        shapes = state_shapes(functools.partial(cls, **kwargs), shape, dtype)
    except RuntimeError:
        raise ConfigError(f"optimizer {cls.__name__}: cannot tell its state size") from None
    return sum(s.numel() * dt.itemsize for s, dt in shapes.values())


def _bnb_8bit_state_bytes(numel: int) -> int:
    if numel < 4096:  # bitsandbytes keeps small tensors' states in 32 bits
        return 2 * 4 * numel
    return 2 * numel + 2 * 4 * math.ceil(numel / 256)  # 2 x uint8 + fp32 absmax per block


class _MetaFlashAttention(torch.autograd.Function):
    """Saves what flash attention saves (q, k, v as given, the output and a log-sum-exp),
    for meta tensors only: its backward never runs."""

    @staticmethod
    def forward(ctx, query, key, value, attn_mask, is_causal, scale):
        out = torch.empty_like(query)
        lse = query.new_empty(query.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, out, lse)
        return out


@contextlib.contextmanager
def _efficient_attention_on_meta():
    """On meta tensors SDPA falls back to the math path, which saves the full attention
    matrix; the kernels that really run (flash / memory-efficient on CUDA, flash on CPU)
    save only q, k, v, the output and a log-sum-exp. Route meta calls to the CPU flash
    kernel's meta implementation so the saved bytes are the real ones."""
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
             enable_gqa=False, **kwargs):
        if not query.is_meta:
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                            is_causal=is_causal, scale=scale, enable_gqa=enable_gqa, **kwargs)
        return _MetaFlashAttention.apply(query, key, value, attn_mask, is_causal, scale)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def activation_bytes(model: nn.Module, groups: list[Group], settings: Settings
                     ) -> list[int]:
    """Bytes autograd keeps for backward while each group is the active one."""
    blocks = list(block_stack(model)[1])
    device = next(model.parameters()).device
    ids = torch.zeros(settings.batch_size, settings.seq_len, dtype=torch.long, device=device)
    labels = ids if settings.causal else torch.zeros(settings.batch_size, dtype=torch.long,
                                                     device=device)
    result = []
    for group in groups:
        active = {id(p) for p in group.params.values()}
        for p in model.parameters():
            p.requires_grad_(id(p) in active)
        saved = SavedBytes(model, blocks)
        with saved, _efficient_attention_on_meta():
            model(input_ids=ids, labels=labels)
        result.append(saved.with_checkpointing() if settings.checkpointing else saved.total)
    for p in model.parameters():
        p.requires_grad_(True)
    return result


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

    def with_checkpointing(self) -> int:
        """Checkpointed blocks keep only their input; one block's internals come back
        at a time during backward."""
        outside = sum(b for b, blk in self.seen.values() if blk is None)
        per_block: dict[int, int] = {}
        for b, blk in self.seen.values():
            if blk is not None:
                per_block[blk] = per_block.get(blk, 0) + b
        inputs = sum(self.block_inputs.get(i, 0) for i in per_block)
        return outside + inputs + max(per_block.values(), default=0)


def estimate(cfg: Config) -> dict:
    """Estimated device bytes per category for fpft and for HiFT (every group)."""
    settings = Settings.of(cfg)
    model = meta_model(cfg)
    units = find_units(model)
    all_params = [p for u in units for p in u.params.values()]
    total_numel = sum(p.numel() for p in all_params)
    states = optimizer_state_bytes(dict(cfg.optimizer), all_params, settings.state_dtype)
    weights = total_numel * settings.weight_bytes
    master_bytes = 4 if settings.mixed else 0

    def column(groups: list[Group], offload: bool) -> list[dict]:
        acts = activation_bytes(model, groups, settings)
        slot = max(sum(states[id(p)] for p in g.params.values()) + g.numel * master_bytes
                   for g in groups)
        rows = []
        for g, act in zip(groups, acts):
            g_states = sum(states[id(p)] for p in g.params.values())
            row = {
                "group": g.name,
                "weights": weights,
                # bf16-mixed: the group's bf16 grads become fp32 grads on its masters,
                # one parameter at a time, so the fp32 ones set the peak.
                "gradients": g.numel * (master_bytes or settings.weight_bytes),
                "optimizer_states": g_states if offload else sum(states.values()),
                "fp32_masters": (g.numel if offload else total_numel) * master_bytes,
                "activations": act,
                # The store's two device slots hold the active and the next group.
                "other": 2 * slot - g_states - g.numel * master_bytes if offload else 0,
            }
            row["total"] = sum(row[c] for c in CATEGORIES)
            rows.append(row)
        return rows

    fpft = column(make_groups(units, "fpft", None, None), offload=False)[0]
    hift_groups = make_groups(units, cfg.hift.strategy if cfg.hift.strategy != "fpft"
                              else "bottom2up", cfg.hift.k, cfg.hift.m)
    # The engine's rule (e.g. no offload with k <= 2); estimates are for the GPU you
    # train on unless trainer.device=cpu.
    offload = offload_enabled(
        False if cfg.hift.strategy == "fpft" else cfg.hift.offload,
        "cpu" if cfg.trainer.device == "cpu" else "cuda", len(hift_groups),
        str(cfg.optimizer["_target_"]))[0]
    per_group = column(hift_groups, offload)
    return _report(cfg, settings, offload, fpft, per_group, len(units), total_numel)


def _report(cfg, settings: Settings, offload: bool, fpft: dict, per_group: list[dict],
            num_units: int, total_params: int) -> dict:
    peak = max(per_group, key=lambda r: r["total"])
    hift = {c: max(r[c] for r in per_group) for c in CATEGORIES}
    hift["total"] = peak["total"]
    return {
        "model": cfg.memprofile.shape or cfg.model.name_or_path,
        "params": total_params,
        "units": num_units,
        "groups": len(per_group),
        "strategy": cfg.hift.strategy,
        "precision": cfg.trainer.precision,
        "optimizer": cfg.optimizer["_target_"],
        "offload": offload,
        "gradient_checkpointing": settings.checkpointing,
        "batch_size": settings.batch_size,
        "seq_len": settings.seq_len,
        "fpft": {k: fpft[k] for k in (*CATEGORIES, "total")},
        "hift": hift,
        "hift_peak_group": peak["group"],
        "per_group": per_group,
    }


# --------------------------------------------------------------------- measurement
class Probe:
    """Measures the categories on a live :class:`~hift_cli.engine.HiftTrainer`.

    Activations: saved-tensor bytes of each training forward pass. Everything else: read
    right after each optimizer step, when the group's gradients, optimizer state and
    masters are all on the device.
    """

    def __init__(self, trainer):
        self.trainer = trainer
        self.rows: list[dict] = []
        self._saved: SavedBytes | None = None
        model = trainer.model
        self._hooks = [
            model.register_forward_pre_hook(self._start),
            model.register_forward_hook(self._stop),
        ]
        trainer.after_update.append(self._read)

    def _start(self, module, args):
        if module.training:
            self._saved = SavedBytes(module, [])
            self._saved.__enter__()

    def _stop(self, module, args, output):
        if self._saved is not None:
            self._saved.__exit__(None, None, None)
            self._activations = self._saved.total
            self._saved = None

    def _read(self, trainer, group: Group) -> None:
        store = trainer.store
        # Host buffers, and the poison strict mode binds away groups' tensors to.
        host = {b.untyped_storage()._cdata for bufs in store.host.values() for b in bufs.values()}
        host.add(store.poison.untyped_storage()._cdata)
        slots = {b.untyped_storage()._cdata for s in store.slots for b in s.values()}

        def tensors(params, masters: bool):
            for p in params:
                if masters:
                    yield p.data
                else:
                    yield from (v for v in trainer.optimizer.state.get(p, {}).values()
                                if torch.is_tensor(v) and v.dim() > 0)

        def device_bytes(ts) -> int:
            return _unique_bytes(t for t in ts if t.untyped_storage()._cdata not in host)

        def slot_bytes(ts) -> int:
            return _unique_bytes(t for t in ts if t.untyped_storage()._cdata in slots)

        active = trainer.opt_params[group.index]
        all_params = [p for ps in trainer.opt_params for p in ps]
        mixed = bool(trainer.masters)
        # The active group's (or, without offload, every group's) state on the device;
        # the next group's, already prefetched into the other slot, counts as "other".
        states = device_bytes(tensors(all_params, False)) - (
            slot_bytes(tensors(all_params, False)) - slot_bytes(tensors(active, False)))
        masters = 0
        if mixed:
            masters = device_bytes(tensors(all_params, True)) - (
                slot_bytes(tensors(all_params, True)) - slot_bytes(tensors(active, True)))
        active_in_slots = slot_bytes(tensors(active, False)) + (
            slot_bytes(tensors(active, True)) if mixed else 0)
        grads = _unique_bytes(p.grad for p in trainer.model.parameters() if p.grad is not None)
        grads += _unique_bytes(m.grad for m in all_params if mixed and m.grad is not None)
        row = {"group": group.name,
               "weights": _unique_bytes(trainer.model.parameters()),
               "gradients": grads,
               "optimizer_states": states,
               "fp32_masters": masters,
               "activations": getattr(self, "_activations", 0),
               "other": store.device_bytes() - active_in_slots}
        row["total"] = sum(row[c] for c in CATEGORIES)
        if trainer.device.type == "cuda":
            row["cuda_peak_allocated"] = torch.cuda.max_memory_allocated(trainer.device)
            torch.cuda.reset_peak_memory_stats(trainer.device)
        self.rows.append(row)

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self.trainer.after_update.remove(self._read)


def _unique_bytes(tensors) -> int:
    """Bytes of the tensors, each memory region once (tied weights, repeated views);
    views into the store's flat buffers count their own bytes, not the whole buffer."""
    seen = {}
    for t in tensors:
        seen[(t.untyped_storage()._cdata, t.storage_offset(), t.nbytes)] = t.nbytes
    return sum(seen.values())


def fixed_shape_batches(batch: int, seq_len: int, vocab: int):
    """Random token ids of one fixed shape, every position a target: memory and time
    depend on the shape alone, so measurements match the estimate's assumptions."""
    g = torch.Generator().manual_seed(0)
    while True:
        ids = torch.randint(3, vocab, (batch, seq_len), generator=g)
        yield {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def measure(cfg: Config, output_dir) -> dict:
    """Real steps at the estimate's batch shape: one fpft step, and one full HiFT cycle
    after a warm-up cycle (which creates every group's optimizer state)."""
    import dataclasses

    from hift_cli.engine import HiftTrainer

    settings = Settings.of(cfg)
    results = {}
    for name, strategy in (("fpft", "fpft"), ("hift", cfg.hift.strategy)):
        run_cfg = dataclasses.replace(
            cfg, hift=dataclasses.replace(cfg.hift, strategy=strategy),
            trainer=dataclasses.replace(cfg.trainer, eval_before=False, save_model=False))
        trainer = HiftTrainer(run_cfg, f"{output_dir}/measure-{name}")
        trainer.setup()
        trainer.eval_set = trainer.eval_set.select([])
        trainer.batches = fixed_shape_batches(settings.batch_size, settings.seq_len,
                                              trainer.model.config.vocab_size)
        k = len(trainer.groups)
        if name == "hift":
            trainer.cfg.trainer.max_steps = k
            trainer.train()
        probe = Probe(trainer)
        trainer.cfg.trainer.max_steps = trainer.global_step + k
        trainer.train()
        probe.close()
        rows = probe.rows
        column = {c: max(r[c] for r in rows) for c in CATEGORIES}
        peak = max(rows, key=lambda r: r["total"])
        column["total"] = peak["total"]
        if "cuda_peak_allocated" in peak:
            column["cuda_peak_allocated"] = max(r["cuda_peak_allocated"] for r in rows)
        results[name] = column
        results[f"{name}_peak_group"] = peak["group"]
        del trainer, probe
    return results


def render(report: dict, measured: dict | None = None):
    """A rich table: rows are categories, columns fpft and HiFT (GiB and % of total)."""
    from rich.table import Table

    unit, scale = ("GiB", GIB) if report["fpft"]["total"] >= GIB else ("MiB", 2**20)
    params = report["params"]
    size = f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.1f}M"
    title = (f"{report['model']}: {size} params, {report['units']} units"
             f" in {report['groups']} groups ({report['strategy']}), {report['precision']},"
             f" {report['optimizer'].rsplit('.', 1)[-1]}, batch {report['batch_size']} x"
             f" {report['seq_len']}, offload {'on' if report['offload'] else 'off'},"
             f" checkpointing {'on' if report['gradient_checkpointing'] else 'off'}")
    table = Table(title=title)
    table.add_column(unit, justify="left")
    for name in ("fpft", "hift"):
        table.add_column(name, justify="right")
        table.add_column("%", justify="right")
        if measured:
            table.add_column(f"{name} measured", justify="right")
    for cat in (*CATEGORIES, "total"):
        cells = [cat.replace("_", " ")]
        for name in ("fpft", "hift"):
            value, total = report[name][cat], report[name]["total"]
            cells += [f"{value / scale:.3f}", f"{100 * value / total:.1f}"]
            if measured:
                cells.append(f"{measured[name][cat] / scale:.3f}")
        table.add_row(*cells, style="bold" if cat == "total" else None)
    table.caption = (f"hift rows: the largest over groups; hift total: the peak group"
                     f" ({report['hift_peak_group']})")
    return table

