"""``make gpu-check``: what only a GPU can show, in one call (< 8 minutes on one GPU).

1. SmolLM2-135M's architecture at batch 8 x 256: step time with optimizer-state offload
   on vs off and the prefetch stall fraction; peak ``torch.cuda.max_memory_allocated`` for
   HiFT vs full fine-tuning (fpft).
2. A random-init LLaMA-7B-shaped model (hidden 4096, 32 layers, bf16-mixed, gradient
   checkpointing, m=1) at batch 8 x 512 tokens: HiFT's measured peak and step time, and
   fpft's peak if it fits (else the OOM is recorded).

Models are built from their config with random weights and fed random token ids of a
fixed shape: memory and time do not depend on the values, and nothing is needed from the
Hub. Writes ``bench/results/gpu-<date>.json`` and ``.md``. On a machine without CUDA it
says so and exits 0 without measuring anything.

On the lent H200 (no PyPI there), carry wheels for what its image lacks (hydra-core,
omegaconf, antlr4-python3-runtime, datasets, dill, multiprocess) and run
``PYTHONPATH=/tmp/site:. python3 bench/gpu_check.py``.

    python bench/gpu_check.py            # what `make gpu-check` runs
    python bench/gpu_check.py --smoke    # the same code on CPU with the tiny model (tests)
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
GIB = 2**30


def compose(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    from hift_cli.config import to_config

    with initialize_config_module("hift_cli.recipes", version_base="1.3"):
        return to_config(hydra_compose("config", overrides=list(overrides)))


def measure(name: str, overrides: list[str], warm_steps: int, steps: int,
            synthetic: tuple[int, int, int] | None = None) -> dict:
    """Train ``warm_steps`` (state gets created), then time ``steps`` more.

    Returns step time, stall fraction and the peak memory of the measured steps; an
    out-of-memory error is recorded instead of raised.
    """
    from hift_cli.engine import HiftTrainer
    from hift_cli.memory import fixed_shape_batches

    import dataclasses

    from hift_cli.memory import estimate

    cfg = compose("trainer.eval_before=false", "trainer.save_model=false", *overrides)
    out = Path(tempfile.mkdtemp(prefix=f"gpu-check-{name}-"))
    result: dict = {"name": name, "overrides": overrides}
    if synthetic:  # hift memprofile's estimate for the same run, to set beside the peak
        report = estimate(dataclasses.replace(
            cfg, memprofile=dataclasses.replace(cfg.memprofile, seq_len=synthetic[1])))
        column = "fpft" if cfg.hift.strategy == "fpft" else "hift"
        result["estimated_peak_gib"] = report[column]["total"] / GIB
    trainer = None
    try:
        trainer = HiftTrainer(cfg, out)
        trainer.setup()
        trainer.eval_set = trainer.eval_set.select([])  # time training only
        if synthetic:
            trainer.batches = fixed_shape_batches(*synthetic)
        cuda = trainer.device.type == "cuda"
        trainer.cfg.trainer.max_steps = warm_steps
        trainer.train()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        trainer.cfg.trainer.max_steps = warm_steps + steps
        trainer.train()
        rows = [json.loads(line) for line in open(out / "metrics.jsonl")][warm_steps:]
        step_seconds = [r["step_seconds"] for r in rows]
        stall = sum(r["offload/stall_seconds"] for r in rows)
        result.update(
            groups=len(trainer.groups),
            offload=trainer.store.enabled,
            mean_step_seconds=statistics.mean(step_seconds),
            tokens_per_second=statistics.mean(r["tokens_per_second"] for r in rows),
            stall_fraction=stall / sum(step_seconds),
            h2d_gib_per_step=statistics.mean(r["offload/h2d_bytes"] for r in rows) / GIB,
            d2h_gib_per_step=statistics.mean(r["offload/d2h_bytes"] for r in rows) / GIB,
            peak_gib=torch.cuda.max_memory_allocated() / GIB if cuda else None,
            store_slot_gib=trainer.store.device_bytes() / GIB,
            final_loss=rows[-1]["train/loss"],
        )
    except torch.cuda.OutOfMemoryError as e:
        result.update(oom=True, error=str(e).splitlines()[0])
    finally:
        del trainer
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(json.dumps(result), flush=True)
    return result


def shape_dir(name: str) -> str:
    """A local model folder with a named architecture and the tiny byte tokenizer."""
    import shutil

    from transformers import AutoConfig

    from hift_cli.config import ASSETS_DIR, SHAPES

    folder = Path(tempfile.mkdtemp(prefix=f"{name}-shape-"))
    preset = dict(SHAPES[name])
    AutoConfig.for_model(preset.pop("model_type"), **preset, eos_token_id=1, pad_token_id=0,
                         bos_token_id=None).save_pretrained(folder)
    for f in (ASSETS_DIR / "tiny_llama").iterdir():
        if "token" in f.name:
            shutil.copy(f, folder / f.name)
    return str(folder)


def run_checks(smoke: bool = False) -> dict:
    """Every measurement, side by side in one process. ``smoke``: tiny model on CPU."""
    device = "cpu" if smoke else "cuda"
    results: dict = {
        "date": dt.date.today().isoformat(),
        "device": platform.processor() or "cpu" if smoke else torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "smoke": smoke,
    }
    # Synthetic batches (random ids, fixed shape) for every run; the tiny instruction
    # file only satisfies setup.
    base = ["recipe=tiny", f"trainer.device={device}", "trainer.log_every=1000000",
            "model.random_init=true", "data.max_samples=16", "data.max_eval_samples=2"]
    tiny_dir = str(Path(__file__).parents[1] / "hift_cli" / "assets" / "tiny_llama")

    small_dir = tiny_dir if smoke else shape_dir("smollm2-135m")
    from hift_cli.config import SHAPES

    small_shape = (4, 32, 384) if smoke else (8, 256, SHAPES["smollm2-135m"]["vocab_size"])
    small = [*base, f"model.name_or_path={small_dir}", f"trainer.batch_size={small_shape[0]}",
             "hift.k=3" if smoke else "hift.k=8"]
    warm, n = (3, 3) if smoke else (8, 16)  # one cycle creates every group's state
    results["smollm2_shape"] = {
        "batch": small_shape[0], "seq_len": small_shape[1],
        "offload_on": measure("offload-on", [*small, "hift.offload=true"], warm, n, small_shape),
        "offload_off": measure("offload-off", [*small, "hift.offload=false"], warm, n,
                               small_shape),
        "fpft": measure("fpft", [*small, "hift.strategy=fpft"], 1, n // 2, small_shape),
    }
    on, off = results["smollm2_shape"]["offload_on"], results["smollm2_shape"]["offload_off"]
    if "mean_step_seconds" in on and "mean_step_seconds" in off:
        results["smollm2_shape"]["offload_step_time_ratio"] = (
            on["mean_step_seconds"] / off["mean_step_seconds"])

    big_dir = tiny_dir if smoke else shape_dir("llama-7b")
    big_shape = (2, 32, 384) if smoke else (8, 512, SHAPES["llama-7b"]["vocab_size"])
    big = [*base, f"model.name_or_path={big_dir}", "model.dtype=bfloat16",
           "trainer.precision=bf16-mixed", "model.gradient_checkpointing=true",
           f"trainer.batch_size={big_shape[0]}"]
    big_warm, big_n = (6, 6) if smoke else (34, 10)  # m=1: 34 groups, one cycle to warm up
    results["llama7b_shape"] = {
        "batch": big_shape[0], "seq_len": big_shape[1],
        "hift_m1": measure("7b-hift", [*big, "hift.k=null", "hift.m=1"], big_warm, big_n,
                           big_shape),
        "fpft": measure("7b-fpft", [*big, "hift.strategy=fpft"], 1, 2, big_shape),
    }
    return results


def write(results: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"gpu-{results['date']}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    s, b = results["smollm2_shape"], results["llama7b_shape"]

    def fmt(r: dict, key: str, spec: str = ".3f") -> str:
        return "OOM" if r.get("oom") else format(r[key], spec) if r.get(key) is not None else "-"

    lines = [
        f"# gpu-check {results['date']} on {results['device']} (torch {results['torch']})", "",
        "Peak: `torch.cuda.max_memory_allocated` over the measured steps; estimated: what"
        " `hift memprofile` predicts for the same settings.", "",
        f"## SmolLM2-135M architecture (random init), k=8, batch {s['batch']} x {s['seq_len']}",
        "",
        "| run | mean step s | stall fraction | H2D GiB/step | peak GiB | estimated GiB |",
        "|---|---|---|---|---|---|",
    ]
    for key in ("offload_on", "offload_off", "fpft"):
        r = s[key]
        lines.append(f"| {key} | {fmt(r, 'mean_step_seconds')} | {fmt(r, 'stall_fraction')} |"
                     f" {fmt(r, 'h2d_gib_per_step')} | {fmt(r, 'peak_gib', '.2f')} |"
                     f" {fmt(r, 'estimated_peak_gib', '.2f')} |")
    if "offload_step_time_ratio" in s:
        lines += ["", f"Step time with offload / without: {s['offload_step_time_ratio']:.3f}"]
    lines += [
        "", f"## LLaMA-7B shape, random init, bf16-mixed, gradient checkpointing, batch"
        f" {b['batch']} x {b['seq_len']}", "",
        "| run | mean step s | stall fraction | peak GiB | estimated GiB |",
        "|---|---|---|---|---|",
    ]
    for key in ("hift_m1", "fpft"):
        r = b[key]
        lines.append(f"| {key} | {fmt(r, 'mean_step_seconds')} | {fmt(r, 'stall_fraction')} |"
                     f" {fmt(r, 'peak_gib', '.2f')} | {fmt(r, 'estimated_peak_gib', '.2f')} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return stem


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="run the same code on CPU with the tiny model; writes nothing")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if not args.smoke and not torch.cuda.is_available():
        print("gpu-check needs CUDA: no GPU on this machine, nothing was measured.")
        return 0
    start = time.perf_counter()
    results = run_checks(smoke=args.smoke)
    results["seconds"] = time.perf_counter() - start
    if args.smoke:
        print(json.dumps(results, indent=2))
        return 0
    stem = write(results)
    print(f"wrote {stem}.json and {stem}.md in {results['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parents[1]))
    sys.exit(main())
