"""The stages of ``make gpu-check`` (``bench/gpu_check.py`` runs each in its own process).

Each stage writes its record to ``<work>/<stage>.json`` after every measurement, so a
crash or a kill keeps what it measured. Models are built from their config with random
weights (``model.random_init``), fed the tiny instruction set (stages 1-3) or random
token ids of a fixed shape (4-6).

1. ``equality``: offload on and off give bit-equal weights, fp32 masters and optimizer
   state (``torch.equal``) for fp32 and bf16-mixed x AdamW, SGD, Adafactor x bottom2up,
   random (a seed whose order repeats a group across a cycle boundary). Deterministic
   CUDA; a control (off vs off) first shows whether the device is deterministic at all.
2. ``races``: the same with a ~20 ms GPU sleep on the side stream before every transfer,
   then on the compute stream before every update: a missing wait shows as a difference.
3. ``resume``: bf16-mixed with offload, checkpointed every 3 steps and resumed in a fresh
   trainer, equals a straight run.
4. ``overlap``: SmolLM2-135M's shape, k=8, batch 8 x 256, offload on vs off and fpft: step
   time, stall fraction, peaks beside ``hift memprofile``'s estimate, host bytes beside
   the exact figure; a 3-step profiler trace (kept, gzipped) and the fraction of
   host-to-device copy time that overlaps compute kernels on another stream.
5. ``llama7b_wide``: LLaMA-7B's layers, 8 of them (10 groups at m=1), bf16-mixed, gradient
   checkpointing, batch 8 x 512: the same figures over a cycle after a warm-up cycle. It
   also projects stage 7's cost from what it measured (its full-size estimates timed).
6. ``llama3_vocab``: Llama-3-8B's shape with 4 of its layers and its whole 128,256-token
   vocabulary (embeddings and head cut into 3 sub-units each, the chunked loss), bf16-mixed,
   checkpointing, m=1, batch 8 x 512: allocated and reserved peaks beside the estimate, and
   what ``hift.memory_reserve`` stands for, measured: the CUDA context (every stage
   records it at its start) plus the allocator's reserved-but-unallocated peak.
7. ``llama7b_full``: all 32 layers, offload on (75 GiB of host buffers): runs only if
   stage 5's host bytes are within 5% of exact and the projection fits the time left;
   then fpft at that shape if time is left (its OOM is a result).
8. ``llama3_full``: stage 6 at all 32 layers (``recipe=llama3_8b_alpaca``'s plan, ~90 GiB
   of host buffers): its peak and the reserve it needs.

Running out of device memory, raised or turned by the trainer into a stop
(``TrainingStopped``), is recorded in the part's entry as ``oom: true`` with its one-line
message; so is a stop after non-finite steps (by its message). Either fails only that
part, and the stage goes on; an OOM where it is a result (fpft) fails nothing.

Every stage runs with ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` unless it is
set, as ``hift train`` does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import gzip
import json
import os
import shutil
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, NamedTuple

import torch

GIB = 2**30
FAIL_ENV = "GPU_CHECK_FAIL_STAGE"
OOM_ENV = "GPU_CHECK_OOM"  # <stage>/<run>: that run's first step raises OutOfMemoryError
TRACE_LIMIT = 12_000_000  # bytes of gzipped trace kept (the device returns files <= 16 MiB)
# The tiny LLaMA's shape (hift_cli/assets/tiny_llama) stands in for the big ones in --smoke.
TINY_SHAPE = dict(model_type="llama", vocab_size=384, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256)


# --------------------------------------------------------------------- stage plumbing
class StageContext:
    """What a stage measures with, and its result, written to disk after every part."""

    def __init__(self, name: str, smoke: bool, work: Path, deadline: float):
        self.name, self.smoke, self.deadline = name, smoke, deadline
        self.device = "cpu" if smoke else "cuda"
        self.cuda = not smoke
        self.path = work / f"{name}.json"
        self.runs = work / name  # run dirs, model folders, checkpoints, the trace
        self.record: dict = {}

    def save(self) -> None:
        _write_json(self.path, self.record)

    def left(self) -> float:
        """Seconds until the orchestrator's deadline."""
        return self.deadline - time.time()

    @contextlib.contextmanager
    def part(self, key: str, into: dict | None = None, oom_ok: bool = False):
        """One measurement: its error is recorded under ``into[key]`` and the stage goes
        on; the record is saved either way.

        Running out of device memory (``torch.cuda.OutOfMemoryError``, or the trainer's
        ``TrainingStopped`` it becomes inside ``train()``) is recorded as ``oom: true``
        and its one-line message, a result where ``oom_ok`` and a failed part otherwise.
        Any other stop of the training (non-finite steps, out of host memory) is a failed
        part with its message; any other exception, one with the end of its traceback.
        """
        from hift_cli.errors import TrainingStopped

        into = self.record if into is None else into
        try:
            yield
        except Exception as e:  # record and carry on (a TrainingStopped too)
            stopped = isinstance(e, TrainingStopped)
            oom = isinstance(e, torch.cuda.OutOfMemoryError) or (
                stopped and e.out_of_memory == "device")
            entry = into[key] if isinstance(into.get(key), dict) else {}
            if oom:
                entry["oom"] = True
            if stopped or oom:
                message = e.message if stopped else str(e)
                entry["error"] = (message or "out of memory").splitlines()[0]
            else:
                entry["error"] = _tail(traceback.format_exc(), 12)
            if not (oom and oom_ok):
                self.record.setdefault("failed_parts", []).append(key)
                print(f"{self.name}/{key} failed:\n{traceback.format_exc()}", file=sys.stderr)
            into[key] = entry
        finally:
            free()
            self.save()


class Stage(NamedTuple):
    name: str
    run: Callable[[StageContext], None]
    cost_s: float  # estimated seconds on the GPU, process start included
    timeout_s: float
    deterministic: bool = False  # bit-equality checks: deterministic CUDA kernels


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _write_json(path: Path, data: dict) -> None:
    """Atomically: a reader (or a kill) never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------- building runs
def compose(*overrides: str):
    """The recipes composed and validated as ``hift train`` does, from an installed
    hift_cli or a plain checkout alike."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from hift_cli.config import recipes_dir, to_config

    with initialize_config_dir(str(recipes_dir()), version_base="1.3"):
        return to_config(hydra_compose("config", overrides=list(overrides)))


def base(ctx: StageContext, samples: int = 16) -> list[str]:
    return ["recipe=tiny", f"trainer.device={ctx.device}", "trainer.eval_before=false",
            "trainer.save_model=false", "trainer.log_every=1000000", "model.random_init=true",
            f"data.max_samples={samples}", "data.max_eval_samples=2"]


def shape_dir(ctx: StageContext, name: str, preset: dict) -> str:
    """A local model folder with the given architecture and the tiny byte tokenizer."""
    from transformers import AutoConfig

    from hift_cli.config import ASSETS_DIR

    folder = ctx.runs / f"shape-{name}"
    folder.mkdir(parents=True, exist_ok=True)
    preset = dict(preset)
    AutoConfig.for_model(preset.pop("model_type"), **preset, eos_token_id=1, pad_token_id=0,
                         bos_token_id=None).save_pretrained(folder)
    for f in (ASSETS_DIR / "tiny_llama").iterdir():
        if "token" in f.name:
            shutil.copy(f, folder / f.name)
    return str(folder)


@contextlib.contextmanager
def models_built_on(device: str):
    """Random init straight on ``device``: seconds instead of minutes for a 7B model.

    Wraps the trainer's model factory (build.py's); if building there fails, builds on the
    CPU as a normal run does. Yields where the model was built (filled in by setup).
    """
    from hift_cli import build

    original = getattr(build, "load_model", None)
    seen: dict = {}
    if original is None:  # the builder changed: build as a normal run does
        seen["init_device"] = "as a normal run (no build.load_model to wrap)"
        yield seen
        return

    def load_on_device(*args, **kwargs):
        try:
            with torch.device(device):
                model = original(*args, **kwargs)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as e:
            seen["init_fallback"] = f"{type(e).__name__}: {e}".splitlines()[0]
            print(f"init on {device} failed ({e}); building on the CPU", file=sys.stderr)
            model = original(*args, **kwargs)
        seen["init_device"] = str(next(model.parameters()).device)
        return model

    build.load_model = load_on_device
    try:
        yield seen
    finally:
        build.load_model = original


@contextlib.contextmanager
def built(ctx: StageContext, cfg, name: str, delays=None):
    """A set-up trainer in ``<work>/<stage>/<name>``, released (host buffers too) afterwards.

    Its out-of-memory stop leaves out the estimated peak (a 7B estimate takes ~15 s; the
    stages record their own). With ``GPU_CHECK_OOM=<stage>/<name>`` (a test hook) its
    first training step raises ``torch.OutOfMemoryError``.
    """
    from hift_cli.engine import HiftTrainer

    free()  # what a failed part left behind (its traceback held it until now)
    trainer = HiftTrainer(cfg, ctx.runs / name)
    trainer.store_delays = delays
    trainer.explain_out_of_memory = False
    try:
        trainer.setup()
        if os.environ.get(OOM_ENV) == f"{ctx.name}/{name}":
            def out_of_memory(*args, **kwargs):
                raise torch.OutOfMemoryError(
                    f"{OOM_ENV}={ctx.name}/{name}: out of memory on purpose (test hook)")

            trainer.update.step = out_of_memory  # HiFT's update rule, this trainer's
        yield trainer  # train(evaluate=False) throughout: time training only
    finally:
        with contextlib.suppress(Exception):
            trainer.store.close()
        del trainer
        free()


def exact_kernels(ctx: StageContext):
    """Deterministic stages: plain math attention (no atomics in its backward)."""
    if not torch.are_deterministic_algorithms_enabled():
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def repeat_seed(k: int, steps: int) -> tuple[int, int]:
    """A seed whose random order repeats a group across a cycle boundary within ``steps``
    steps of ``k`` groups (the store keeps that group on the device), and the cycle."""
    from hift_cli.grouping import GroupSchedule

    for seed in range(1000):
        s = GroupSchedule("random", k, seed)
        for c in range(steps // k - 1):
            if s.order(c)[-1] == s.order(c + 1)[0]:
                return seed, c
    raise RuntimeError(f"no seed below 1000 repeats a group within {steps} steps of k={k}")


# --------------------------------------------------------------------- bit-equality
def snapshot(trainer) -> dict:
    """Weights, fp32 masters and optimizer state, copied to the CPU, by parameter name."""
    def copy(v):
        return v.detach().to("cpu", copy=True) if torch.is_tensor(v) else v

    out = {f"weight/{n}": copy(p) for n, p in trainer.model.named_parameters()}
    with trainer.store.readable():
        for group, params in zip(trainer.groups, trainer.opt_params, strict=True):
            for name, p in zip(group.params, params, strict=True):
                if trainer.masters:
                    out[f"master/{name}"] = copy(p)
                for key, value in trainer.optimizer.state.get(p, {}).items():
                    out[f"state/{name}/{key}"] = copy(value)
    return out


def compare(a: dict, b: dict) -> dict:
    """Bit-equality of two snapshots, counted per kind (weight, master, state).

    Tensors must agree in dtype, shape and every value (``torch.equal``); anything else
    (a step count, None) with ``==``.
    """
    kinds: dict = {}
    first = None
    for key in sorted(a.keys() | b.keys()):
        x, y = a.get(key), b.get(key)
        if torch.is_tensor(x) and torch.is_tensor(y):
            same = x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
        else:
            same = key in a and key in b and not torch.is_tensor(x) and not torch.is_tensor(y) \
                and x == y
        kind = kinds.setdefault(key.split("/", 1)[0], {"tensors": 0, "different": 0})
        kind["tensors"] += 1
        if not same:
            kind["different"] += 1
            first = first or key
    return {"equal": first is None, "kinds": kinds, "first_difference": first}


def pinned(store) -> bool | None:
    """Whether every host buffer is page-locked (None: nothing offloaded, or no CUDA)."""
    held = store.footprint()
    return held.pinned if store.enabled and torch.cuda.is_available() and held.host_bytes \
        else None


def trained_snapshot(ctx: StageContext, name: str, overrides: list[str],
                     delays=None) -> tuple[dict, dict]:
    """Train a tiny run (``delays``: the store's race amplifiers, offload.Delays); its
    snapshot and a few facts about it."""
    with built(ctx, compose(*base(ctx, 64), *overrides), name, delays) as trainer:
        with exact_kernels(ctx):
            summary = trainer.train(evaluate=False)
        return snapshot(trainer), {"offload": trainer.store.enabled,
                                   "pinned": pinned(trainer.store),
                                   "loss": summary.get("train/loss")}


def stage_equality(ctx: StageContext) -> None:
    steps = 6 if ctx.smoke else 18
    seed, cycle = repeat_seed(3, steps)  # the tiny recipe: k=3
    ctx.record.update(steps=steps, random_seed=seed, random_repeat_after_cycle=cycle,
                      deterministic=torch.are_deterministic_algorithms_enabled())
    common = [f"trainer.max_steps={steps}"]
    with ctx.part("control"):
        a, _ = trained_snapshot(ctx, "control-a", [*common, "hift.offload=false"])
        b, _ = trained_snapshot(ctx, "control-b", [*common, "hift.offload=false"])
        ctx.record["control"] = compare(a, b)
        if not ctx.record["control"]["equal"]:
            ctx.record["note"] = ("two offload-off runs differ: this device/software is not"
                                  " deterministic, so on-vs-off differences below are moot")
    combos = ([("bf16-mixed", "adamw", "random")] if ctx.smoke else
              [(p, o, s) for p in ("fp32", "bf16-mixed") for o in ("adamw", "sgd", "adafactor")
               for s in ("bottom2up", "random")])
    matrix = ctx.record.setdefault("matrix", {})
    for precision, optimizer, strategy in combos:
        label = f"{precision}/{optimizer}/{strategy}"
        with ctx.part(label, into=matrix):
            opts = [*common, f"trainer.precision={precision}", f"optimizer={optimizer}",
                    f"model.dtype={'float32' if precision == 'fp32' else 'bfloat16'}",
                    f"hift.strategy={strategy}", f"trainer.seed={seed}"]
            off, _ = trained_snapshot(ctx, f"{label}-off", [*opts, "hift.offload=false"])
            on, facts = trained_snapshot(ctx, f"{label}-on", [*opts, "hift.offload=true"])
            matrix[label] = {**compare(off, on), "offload": facts["offload"],
                             "pinned": facts["pinned"]}
    rows = [r for r in matrix.values() if "equal" in r]
    ctx.record["all_equal"] = bool(rows) and all(r["equal"] for r in rows)
    ctx.record["pinned"] = all(r["pinned"] for r in rows) if ctx.cuda and rows else None


def gpu_sleep(ctx: StageContext, seconds: float = 0.02) -> tuple[Callable[[], None], float]:
    """A ~``seconds`` spin on the current CUDA stream (``torch.cuda._sleep``, calibrated
    with CUDA events), and the measured milliseconds; a no-op on the CPU."""
    if not ctx.cuda:
        return (lambda: None), 0.0

    def timed(cycles: int) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    timed(1000)  # warm-up
    probe = 10_000_000
    cycles = max(1, int(probe * seconds * 1000 / timed(probe)))
    return (lambda: torch.cuda._sleep(cycles)), timed(cycles)


def stage_races(ctx: StageContext) -> None:
    steps = 6 if ctx.smoke else 18
    seed, _ = repeat_seed(3, steps)
    from hift_cli.offload import Delays

    sleep, ms = gpu_sleep(ctx)
    ctx.record.update(steps=steps, random_seed=seed, delay_ms=ms,
                      deterministic=torch.are_deterministic_algorithms_enabled())
    runs = ctx.record.setdefault("runs", {})
    for precision in ("bf16-mixed",) if ctx.smoke else ("fp32", "bf16-mixed"):
        opts = [f"trainer.max_steps={steps}", f"trainer.precision={precision}",
                f"model.dtype={'float32' if precision == 'fp32' else 'bfloat16'}",
                "optimizer=adamw", "hift.strategy=random", f"trainer.seed={seed}"]
        reference = None
        for delay, delays in (("side_delay", Delays(copy=sleep)),
                              ("compute_delay", Delays(update=sleep))):
            label = f"{precision}/{delay}"
            with ctx.part(label, into=runs):
                if reference is None:
                    reference, _ = trained_snapshot(ctx, f"{precision}-off",
                                                    [*opts, "hift.offload=false"])
                on, facts = trained_snapshot(ctx, label.replace("/", "-"),
                                             [*opts, "hift.offload=true"], delays)
                runs[label] = {**compare(reference, on), "offload": facts["offload"]}
    ctx.record["all_equal"] = bool(runs) and all(r.get("equal") for r in runs.values())


def stage_resume(ctx: StageContext) -> None:
    from hift_cli.checkpoint import complete_checkpoints

    steps = 9 if ctx.smoke else 12
    seed, _ = repeat_seed(3, steps)
    opts = [*base(ctx, 64), f"trainer.max_steps={steps}", "trainer.precision=bf16-mixed",
            "model.dtype=bfloat16", "hift.offload=true", "hift.strategy=random",
            f"trainer.seed={seed}"]
    ctx.record.update(steps=steps, random_seed=seed,
                      deterministic=torch.are_deterministic_algorithms_enabled())
    checks = ctx.record.setdefault("checks", {})
    with ctx.part("straight", into=checks):
        with built(ctx, compose(*opts), "straight") as trainer, exact_kernels(ctx):
            trainer.train(evaluate=False)
            straight = snapshot(trainer)
    with ctx.part("chunked_vs_straight", into=checks):
        # Three steps per train() call, a checkpoint after each (keeps the last two).
        with built(ctx, compose(*opts), "chunked") as trainer, exact_kernels(ctx):
            for _ in range(3, steps, 3):
                trainer.train(3, evaluate=False)
                trainer.checkpoint(keep_last=2)
            trainer.train(evaluate=False)
            checks["chunked_vs_straight"] = compare(straight, snapshot(trainer))
    with ctx.part("resumed_vs_straight", into=checks):
        path = complete_checkpoints(ctx.runs / "chunked")[0]
        with built(ctx, compose(*opts), "resumed") as trainer, exact_kernels(ctx):
            trainer.resume(path)
            trainer.train(evaluate=False)
            checks["resumed_vs_straight"] = {**compare(straight, snapshot(trainer)),
                                             "resumed_from": path.name}
    ctx.record["all_equal"] = all(c.get("equal") for k, c in checks.items() if k != "straight")


# --------------------------------------------------------------------- performance
def estimated(cfg, seq_len: int) -> dict:
    """What ``hift memprofile`` predicts for the same run, to set beside the peaks."""
    from hift_cli.memory import estimate

    report = estimate(dataclasses.replace(
        cfg, memprofile=dataclasses.replace(cfg.memprofile, seq_len=seq_len)))
    fpft = cfg.hift.strategy == "fpft"
    return {"estimated_peak_gib": report["fpft" if fpft else "hift"]["total"] / GIB,
            "estimated_offload": False if fpft else report["offload"],
            "params": report["params"], "estimated_groups": report["groups"],
            # Every group's masters and optimizer state: what offloading keeps on the host.
            "estimated_state_gib": (report["fpft"]["optimizer_states"]
                                    + report["fpft"]["fp32_masters"]) / GIB}


def measure(ctx: StageContext, trainer, shape: tuple[int, int], warm_cycles: int,
            cycles: int) -> dict:
    """Train ``warm_cycles`` (every group's state gets created) then ``cycles`` more
    whole cycles in one ``train()`` call; figures are over the measured cycles, and the
    CUDA peaks are reset after the last warm-up step's write-back (``peaks_reset``: at
    which step, after how many write-backs)."""
    from hift_cli.memory import fixed_shape_batches

    k = len(trainer.groups)
    warm, steps = warm_cycles * k, cycles * k
    batches = fixed_shape_batches(*shape, trainer.model.config.vocab_size)
    reset: dict = {}
    last_warm = trainer.global_step + warm

    def reset_peaks(tr, group) -> None:
        # The last warm-up step's write-back is queued: the state its group's first
        # update created outside the slots is no longer referenced. Its copies done, the
        # peaks from here on are the measured cycles' own.
        if tr.global_step == last_warm:
            tr.store.synchronize()
            if ctx.cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            reset.update(step=tr.global_step,
                         writebacks=sum(tr.store.footprint().writebacks.values()))

    free()  # setup's leftovers (e.g. the fp32 init) are not the run's
    trainer.after_step.append(reset_peaks)
    start = time.perf_counter()
    trainer.train(warm + steps, evaluate=False, batches=batches)
    seconds = time.perf_counter() - start
    trainer.after_step.remove(reset_peaks)
    rows = [json.loads(line) for line in
            (trainer.output_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "step_seconds" in r]
    warm_rows, rows = rows[-(warm + steps):-steps], rows[-steps:]
    step_seconds = [r["step_seconds"] for r in rows]
    store = trainer.store
    held = store.footprint(exact=store.enabled)
    result = {
        "groups": k, "offload": store.enabled, "warm_steps": warm, "measured_steps": steps,
        "train_seconds": seconds, "peaks_reset": reset or None,
        "mean_step_seconds": statistics.mean(step_seconds),
        "warm_step_seconds": statistics.mean(r["step_seconds"] for r in warm_rows),
        "tokens_per_second": statistics.mean(r["tokens_per_second"] for r in rows),
        "stall_fraction": sum(r["offload/stall_seconds"] for r in rows) / sum(step_seconds),
        "h2d_gib_per_step": statistics.mean(r["offload/h2d_bytes"] for r in rows) / GIB,
        "d2h_gib_per_step": statistics.mean(r["offload/d2h_bytes"] for r in rows) / GIB,
        "final_loss": rows[-1]["train/loss"],
        "host_gib": held.host_bytes / GIB,
        # What the buffers should total (masters and optimizer state, read off the tensors)
        "exact_host_gib": held.exact_host_bytes / GIB if store.enabled else None,
        "slots_gib": held.device_bytes / GIB,
        "pinned": pinned(store),
    }
    result.update(process_memory())
    if ctx.cuda:
        result.update(peak_allocated_gib=torch.cuda.max_memory_allocated() / GIB,
                      peak_reserved_gib=torch.cuda.max_memory_reserved() / GIB,
                      # PyTorch's pinned caching allocator (input batches; the store's
                      # buffers only if cudaHostRegister failed)
                      pinned_allocator_gib=getattr(torch.cuda, "host_memory_stats", dict)().get(
                          "allocated_bytes.current", 0) / GIB)
    return result


def process_memory() -> dict:
    """This process's resident and locked/pinned memory as the kernel counts it
    (``/proc/self/status``): an outside view of the page-locked host buffers."""
    out = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "VmLck", "VmPin") and value.strip().endswith("kB"):
                out[f"proc_{key}_gib"] = int(value.split()[0]) / 2**20
    return out


def perf_run(ctx: StageContext, runs: dict, name: str, overrides: list[str],
             shape: tuple[int, int], warm_cycles: int, cycles: int,
             then: Callable | None = None) -> None:
    """One measured configuration into ``runs[name]`` (setup time included)."""
    cfg = compose(*base(ctx), f"trainer.batch_size={shape[0]}", *overrides)
    start = time.perf_counter()
    runs[name] = estimated(cfg, shape[1])
    runs[name]["estimate_seconds"] = time.perf_counter() - start
    ctx.save()
    start = time.perf_counter()
    with models_built_on(ctx.device) as init, built(ctx, cfg, name) as trainer:
        runs[name].update(init, setup_seconds=time.perf_counter() - start)
        ctx.save()  # if a kill comes during training, setup at least is known
        runs[name].update(measure(ctx, trainer, shape, warm_cycles, cycles))
        ctx.save()
        if then is not None:
            then(trainer)


def ratio(runs: dict) -> float | None:
    on, off = runs.get("offload_on", {}), runs.get("offload_off", {})
    if "mean_step_seconds" in on and "mean_step_seconds" in off:
        return on["mean_step_seconds"] / off["mean_step_seconds"]
    return None


def copy_overlap(trace: dict, direction: str = "HtoD", against: str | None = None) -> dict:
    """How much of the ``direction`` copy time overlaps work on another stream: compute
    kernels, or (``against="DtoH"`` etc.) copies the other way, which the store issues on
    a stream of their own so that the link carries both directions at once.

    ``trace`` is a chrome trace as ``torch.profiler`` exports it: complete events with
    ``ts``/``dur`` in microseconds, copies in category ``gpu_memcpy`` (named e.g.
    ``Memcpy HtoD (Pinned -> Device)``), kernels in ``kernel``; on the GPU ``pid`` is the
    device and ``tid`` the stream.
    """
    events = [e for e in trace.get("traceEvents", []) if e.get("ph", "X") == "X"]

    def copies_of(way: str) -> list:
        return [e for e in events if e.get("cat") == "gpu_memcpy" and way in e.get("name", "")]

    others = [e for e in events if e.get("cat") == "kernel"] if against is None \
        else copies_of(against)
    spans_by_device: dict = {}
    for e in others:
        spans_by_device.setdefault(e.get("pid"), []).append(
            (float(e["ts"]), float(e["ts"]) + float(e["dur"]), e.get("tid")))
    copies = copies_of(direction)
    total = overlapped = 0.0
    for c in copies:
        start, end = float(c["ts"]), float(c["ts"]) + float(c["dur"])
        spans = sorted((max(s, start), min(t, end)) for s, t, tid in
                       spans_by_device.get(c.get("pid"), [])
                       if tid != c.get("tid") and s < end and t > start)
        reach = start  # union of the clipped spans
        for s, t in spans:
            overlapped += max(0.0, t - max(s, reach))
            reach = max(reach, t)
        total += end - start
    return {"copies": len(copies), "copy_us": total, "overlapped_us": overlapped,
            "overlap_fraction": overlapped / total if total else None}


def stream_busy(trace: dict) -> dict:
    """Per GPU stream of the trace: its events (kernels, copies, memsets) and the time it
    was busy (their union), beside the span from the first GPU event's start to the last
    one's end; ``compute_busy_fraction``: that of the stream with the most kernel time.
    A compute stream idle while copies run says the copies (or the host) hold it up."""
    kinds = {"kernel", "gpu_memcpy", "gpu_memset"}
    events = [e for e in trace.get("traceEvents", [])
              if e.get("ph", "X") == "X" and e.get("cat") in kinds]
    if not events:
        return {}
    first = min(float(e["ts"]) for e in events)
    last = max(float(e["ts"]) + float(e["dur"]) for e in events)
    streams: dict = {}
    for e in events:
        streams.setdefault(str(e.get("tid")), []).append(e)
    out = {}
    for tid, evs in streams.items():
        spans = sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in evs)
        busy, reach = 0.0, first
        for s, t in spans:
            busy += max(0.0, t - max(s, reach))
            reach = max(reach, t)
        kernel_us = sum(float(e["dur"]) for e in evs if e.get("cat") == "kernel")
        out[tid] = {"events": len(evs), "busy_ms": busy / 1e3, "kernel_ms": kernel_us / 1e3,
                    "copy_ms": sum(float(e["dur"]) for e in evs
                                   if e.get("cat") == "gpu_memcpy") / 1e3}
    compute = max(out, key=lambda tid: out[tid]["kernel_ms"])
    return {"span_ms": (last - first) / 1e3, "compute_stream": compute,
            "compute_busy_fraction": out[compute]["busy_ms"] * 1e3 / (last - first),
            "streams": out}


def profile(ctx: StageContext, trainer, steps: int, suffix: str = "") -> dict:
    """``steps`` more steps under torch.profiler; the trace's copy/compute overlap and
    each stream's busy time, and the trace itself, gzipped (GPU events and CUDA runtime
    calls only if the whole one is too big)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.cuda else [])
    with torch_profile(activities=activities) as prof:
        trainer.train(steps, evaluate=False)
    raw = ctx.runs / "trace.json"
    prof.export_chrome_trace(str(raw))
    trace = json.loads(raw.read_text())
    result = {"steps": steps, "h2d": copy_overlap(trace, "HtoD"),
              "d2h": copy_overlap(trace, "DtoH"),
              # the two copy streams side by side: write-backs during fills
              "d2h_during_h2d": copy_overlap(trace, "DtoH", against="HtoD"),
              **stream_busy(trace)}
    path = ctx.runs / f"{ctx.name}{suffix}-trace.json.gz"
    data = gzip.compress(raw.read_bytes())
    if len(data) > TRACE_LIMIT:
        gpu = {"kernel", "gpu_memcpy", "gpu_memset", "gpu_user_annotation", "cuda_runtime"}
        trace["traceEvents"] = [e for e in trace["traceEvents"]
                                if e.get("ph") == "M" or e.get("cat") in gpu]
        data = gzip.compress(json.dumps(trace).encode())
        result["trace_filtered"] = ("GPU events and CUDA runtime calls only (the whole"
                                    " trace was over the limit)")
    raw.unlink()
    if len(data) <= TRACE_LIMIT:
        path.write_bytes(data)
        result.update(trace_file=str(path), trace_bytes=len(data))
    else:
        result["trace_dropped"] = f"{len(data)} bytes gzipped, over {TRACE_LIMIT}"
    return result


def stage_overlap(ctx: StageContext) -> None:
    from hift_cli.config import SHAPES

    shape, k = ((2, 32), 3) if ctx.smoke else ((8, 256), 8)
    folder = shape_dir(ctx, "smollm2-135m", TINY_SHAPE if ctx.smoke else SHAPES["smollm2-135m"])
    ctx.record.update(model="SmolLM2-135M shape, random init", batch=shape[0],
                      seq_len=shape[1], k=k, precision="fp32", warm_cycles=1, cycles=2)
    common = [f"model.name_or_path={folder}", f"hift.k={k}"]
    runs = ctx.record.setdefault("runs", {})

    def traced(trainer) -> None:
        with ctx.part("trace"):
            ctx.record["trace"] = profile(ctx, trainer, 3)

    with ctx.part("offload_on", into=runs):
        perf_run(ctx, runs, "offload_on", [*common, "hift.offload=true"], shape, 1, 2, traced)
    with ctx.part("offload_off", into=runs):
        perf_run(ctx, runs, "offload_off", [*common, "hift.offload=false"], shape, 1, 2)
    with ctx.part("fpft", into=runs, oom_ok=True):
        perf_run(ctx, runs, "fpft", [*common, "hift.strategy=fpft"], shape, 1, 2)
    ctx.record["step_time_ratio"] = ratio(runs)


BIG = ["trainer.precision=bf16-mixed", "model.dtype=bfloat16",
       "model.gradient_checkpointing=true", "hift.k=null", "hift.m=1"]


def llama_shape(ctx: StageContext, layers: int) -> dict:
    from hift_cli.config import SHAPES

    return {**(TINY_SHAPE if ctx.smoke else SHAPES["llama-7b"]), "num_hidden_layers": layers}


def project_full(ctx: StageContext, on: dict, layers: int, full_layers: int,
                 shape: tuple[int, int]) -> dict:
    """Stage llama7b_full's cost, scaled from this stage's offload-on run.

    Setup (host buffers, masters) scales with the parameters; a step with the depth (the
    forward pass runs every layer, backward down to the active group); the first cycle's
    extra per step (state creation) is per group. Each of that stage's runs (offload_on,
    fpft) starts with a memory estimate at full size: this one, timed. Padded by a quarter.
    """
    folder = shape_dir(ctx, "llama-7b-full", llama_shape(ctx, full_layers))
    start = time.perf_counter()
    full = estimated(compose(*base(ctx), f"model.name_or_path={folder}",
                             f"trainer.batch_size={shape[0]}", *BIG), shape[1])
    estimate = time.perf_counter() - start
    scale, depth = full["params"] / on["params"], full_layers / layers
    groups = full["estimated_groups"]
    extra = max(on["warm_step_seconds"] - on["mean_step_seconds"], 0.0)
    seconds = (ctx.record["startup_seconds"] + 2 * estimate + on["setup_seconds"] * scale
               + groups * (2 * depth * on["mean_step_seconds"] + extra))
    return {"seconds": 1.25 * seconds + 10, "params": full["params"], "groups": groups,
            "host_gib": full["estimated_state_gib"], "estimated_peak_gib":
            full["estimated_peak_gib"], "scale": scale, "estimate_seconds": estimate}


def llama_runs(ctx: StageContext, layers: int) -> tuple[dict, list[str], tuple[int, int]]:
    """LLaMA-7B's layers (``layers`` of them), bf16-mixed, checkpointing, m=1, batch
    8 x 512: the record's description, the overrides and the batch shape."""
    shape = (2, 32) if ctx.smoke else (8, 512)
    folder = shape_dir(ctx, f"llama-7b-{layers}", llama_shape(ctx, layers))
    ctx.record.update(model=f"LLaMA-7B shape, {layers} layers, random init", layers=layers,
                      batch=shape[0], seq_len=shape[1], precision="bf16-mixed",
                      gradient_checkpointing=True, m=1, warm_cycles=1, cycles=1)
    return ctx.record.setdefault("runs", {}), [f"model.name_or_path={folder}", *BIG], shape


def stage_llama7b_wide(ctx: StageContext) -> None:
    layers, full_layers = (2, 4) if ctx.smoke else (8, 32)
    runs, common, shape = llama_runs(ctx, layers)

    def traced(key: str) -> Callable:
        def then(trainer) -> None:
            with ctx.part(key):
                ctx.record[key] = profile(ctx, trainer, 3, suffix=key.removeprefix("trace"))
        return then

    with ctx.part("offload_on", into=runs):
        perf_run(ctx, runs, "offload_on", [*common, "hift.offload=true"], shape, 1, 1,
                 traced("trace"))
    with ctx.part("projection"):
        ctx.record["projection"] = project_full(ctx, runs["offload_on"], layers, full_layers,
                                                shape)
    with ctx.part("offload_off", into=runs):
        perf_run(ctx, runs, "offload_off", [*common, "hift.offload=false"], shape, 1, 1,
                 traced("trace_off"))
    ctx.record["step_time_ratio"] = ratio(runs)
    # fpft at this depth fits the device: its peak beside the estimate (at 32 layers it
    # does not, and only its OOM is seen).
    with ctx.part("fpft", into=runs, oom_ok=True):
        perf_run(ctx, runs, "fpft", [*common, "hift.strategy=fpft"], shape, 1, 1)


def stage_llama3_vocab(ctx: StageContext, layers: int = 4) -> None:
    from hift_cli.config import SHAPES

    shape = (2, 32) if ctx.smoke else (8, 512)
    # The smoke run: the tiny LLaMA with a vocabulary wider than its blocks.
    preset = {**(dict(TINY_SHAPE, vocab_size=2048) if ctx.smoke else SHAPES["llama-3-8b"]),
              "num_hidden_layers": layers}
    folder = shape_dir(ctx, f"llama-3-8b-{layers}", preset)
    ctx.record.update(model=f"Llama-3-8B shape, {layers} layers, its whole vocabulary"
                      f" ({preset['vocab_size']}), random init", layers=layers, batch=shape[0],
                      seq_len=shape[1], precision="bf16-mixed", gradient_checkpointing=True,
                      m=1, warm_cycles=1, cycles=1)
    runs = ctx.record.setdefault("runs", {})
    with ctx.part("offload_on", into=runs):
        perf_run(ctx, runs, "offload_on", [f"model.name_or_path={folder}", *BIG,
                                           "hift.offload=true"], shape, 1, 1)
    on = runs.get("offload_on", {})
    if "peak_allocated_gib" in on:
        # hift.memory_reserve's default stands for this: the context and the allocator's
        # free blocks at the peak.
        on["estimate_error"] = on["peak_allocated_gib"] / on["estimated_peak_gib"] - 1
        on["measured_reserve_gib"] = (ctx.record.get("cuda_context_gib", 0)
                                      + on["peak_reserved_gib"] - on["peak_allocated_gib"])
        # What the reserve must cover on a card that holds nothing else: the process's
        # whole need (context + peak reserved) over the estimate.
        on["need_over_estimate_gib"] = (ctx.record.get("cuda_context_gib", 0)
                                        + on["peak_reserved_gib"] - on["estimated_peak_gib"])
        from hift_cli.config import RESERVE_FRACTION, RESERVE_MIN_GIB
        on["default_reserve_gib"] = max(RESERVE_MIN_GIB, RESERVE_FRACTION * 24)
        ctx.save()


def stage_llama7b_full(ctx: StageContext) -> None:
    runs, common, shape = llama_runs(ctx, 4 if ctx.smoke else 32)
    with ctx.part("offload_on", into=runs):
        perf_run(ctx, runs, "offload_on", [*common, "hift.offload=true"], shape, 1, 1)
    # Its estimate (as long as offload_on's), a build on the GPU, one step, maybe an OOM.
    need = 0 if ctx.smoke else 45 + runs.get("offload_on", {}).get("estimate_seconds", 15)
    if ctx.left() < need:
        runs["fpft"] = {"skipped": f"{ctx.left():.0f} s left, fpft needs ~{need:.0f} s"}
        return
    with ctx.part("fpft", into=runs, oom_ok=True):
        perf_run(ctx, runs, "fpft", [*common, "hift.strategy=fpft"], shape, 1, 1)


def stage_llama3_full(ctx: StageContext) -> None:
    """``llama3_vocab`` at Llama-3-8B's whole depth (38 groups, ~90 GiB of host buffers):
    the peak and reserve of the plan ``recipe=llama3_8b_alpaca`` had at batch 8 x 512 with a
    1 GiB reserve (22.41 GiB estimated). Measured 2026-12-04: 22.18 GiB allocated, 24.18 GiB
    with the context and the allocator's free blocks, which set ``hift.memory_reserve``'s
    default to 2 GiB (docs/memory.md)."""
    stage_llama3_vocab(ctx, layers=4 if ctx.smoke else 32)


# Priority order. Costs on the H200: tiny runs take 1-2 s each (25 in equality); the
# 135M runs a few seconds; the 8-layer 7B-wide runs ~20 s each (22 GiB of host buffers).
STAGES = {s.name: s for s in [
    Stage("equality", stage_equality, cost_s=60, timeout_s=150, deterministic=True),
    Stage("races", stage_races, cost_s=30, timeout_s=90, deterministic=True),
    Stage("resume", stage_resume, cost_s=25, timeout_s=90, deterministic=True),
    Stage("overlap", stage_overlap, cost_s=50, timeout_s=150),
    Stage("llama7b_wide", stage_llama7b_wide, cost_s=100, timeout_s=240),
    # 1.9B parameters (23 GiB of host buffers), 10 groups x 2 cycles.
    Stage("llama3_vocab", stage_llama3_vocab, cost_s=70, timeout_s=200),
    Stage("llama7b_full", stage_llama7b_full, cost_s=0, timeout_s=1e9),  # cost: projected
    # 8.0B parameters: llama7b_full measured 74 s for 6.7B (setup 26 s, 34 steps).
    Stage("llama3_full", stage_llama3_full, cost_s=110, timeout_s=240),
]}
SMOKE_COST_S, SMOKE_TIMEOUT_S = 10, 240


def run_stage(name: str, smoke: bool, work: Path, deadline: float, started: float) -> int:
    """``--stage``: one stage in this process; its result goes to ``<work>/<name>.json``."""
    stage = STAGES[name]
    # As hift train: growable segments, little fragmentation (hift.memory_reserve).
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if stage.deterministic:  # before CUDA starts
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    import hift_cli
    import hift_cli.engine  # noqa: F401  (the heavy imports belong to the startup cost)
    from hift_cli.config import recipes_dir

    ctx = StageContext(name, smoke, work, deadline)
    if not smoke:
        torch.zeros(1, device="cuda")  # CUDA start, counted in startup
        free, total = torch.cuda.mem_get_info()
        # What the process holds on the device besides PyTorch's own blocks.
        ctx.record["cuda_context_gib"] = (total - free - torch.cuda.memory_reserved()) / GIB
    ctx.record.update(
        device=torch.cuda.get_device_name() if not smoke else "cpu",
        device_memory_gib=torch.cuda.get_device_properties(0).total_memory / GIB
        if not smoke else None,
        torch=torch.__version__, cuda=torch.version.cuda, hift_cli=hift_cli.__file__,
        recipes=str(recipes_dir()), startup_seconds=time.time() - started)
    ctx.save()
    if os.environ.get(FAIL_ENV) == name:
        raise RuntimeError(f"{FAIL_ENV}={name}: failing on purpose (test hook)")
    stage.run(ctx)
    ctx.save()
    failed = ctx.record.get("failed_parts")
    if failed:
        print(f"stage {name}: failed parts: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0

