"""The ``peers`` suites of ``make bench``: what a user would pick instead of HiFT, side by side.

Every method trains the same model from the same pretrained weights on the same batches in
the same order for the same number of epochs, is evaluated by the same code after every
epoch, and runs in its own process (its peak RSS is its own, read with ``wait4``):

- ``fpft`` (AdamW), HiFT (the quality suite's best configuration and ``m=1``) and LISA's
  layer sampling run by ``hift train`` itself;
- LoRA (``peft``), BAdam (``badam``), GaLore (``galore-torch``) and LOMO / AdaLomo
  (``lomo-optim``) run by this file's ``--child`` mode as update rules
  (``hift_cli.update.Update``) of ``hift train``'s own task and loop: an fpft
  ``HiftTrainer`` is set up and trains with the peer's update, so the batches, the loss
  weighting, the metrics rows, the evaluation and the summary are hift's own and the
  update rule is the only difference. Each peer is configured as its own documentation
  advises; the settings and the package version go into the results.

A peer that is not installed, or that cannot run here (AdaLomo allocates its state with
``.cuda()``), gets a row that says why. The peers are the optional extra
``pip install -e '.[peers]'``, never a dependency of ``hift``.

Beside the measured table: each method's device memory for LLaMA-7B at batch 8 x 512 in
bf16, HiFT's and LISA's from ``hift memprofile``, the others from their documented memory
models applied to the same shape (``memory_7b``).

Used by ``bench/compare.py`` (``--suite peers-minilm``).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import quality
from collect import collect, point
from hift_cli.update import StepResult, Update

ROOT = Path(__file__).resolve().parent.parent


def merge(*lists: list[str]) -> list[str]:
    """key=value overrides, a later value of a key replacing the earlier one."""
    merged: dict[str, str] = {}
    for item in (o for overrides in lists for o in overrides):
        merged[item.split("=", 1)[0]] = item
    return list(merged.values())


# Method kinds: "hift" runs `hift train` with these overrides; "peer" runs --child.
HIFT_METHODS = {
    "fpft": {"overrides": ["hift.strategy=fpft"], "what": "every parameter, AdamW"},
    "hift-k4": {"overrides": ["hift.strategy=bottom2up", "hift.k=4"],
                "what": "HiFT, 4 groups (within the spread of k=auto, the quality suites' best"
                        " at equal epochs, 2026-12-04)"},
    "hift-m1": {"overrides": ["hift.strategy=bottom2up", "hift.m=1"],
                "what": "HiFT, one unit per group"},
    # HiFT as the quality suites found it best: the fewest groups that fit (k=auto under
    # their budget, which fpft does not fit: 3 groups on MiniLM) given k times the epochs,
    # so each parameter is updated as often as fpft's. Its columns at E epochs are equal
    # epochs; "within fpft's time" is the equal-time comparison.
    "hift-auto-x3": {"overrides": ["hift.strategy=bottom2up", "hift.k=auto"], "budget": True,
                     "epochs_times": 3,
                     "what": "HiFT, k=auto under the quality suites' budget (fpft does not fit"
                             " it), given 3x the epochs"},
    # LISA: embeddings + head every step, one block drawn at random, kept for 20 steps
    # (LMFlow's scripts/run_finetune_with_lisa.sh: lisa_activated_layers=1,
    # lisa_interval_steps=20). hift draws without replacement, reshuffled every cycle.
    "lisa (hift)": {"overrides": ["hift.strategy=random", "hift.m=1", "hift.steps_per_group=20",
                                  "hift.always_active=[embeddings,head]"],
                    "what": "hift's implementation of LISA's sampling: embeddings + head"
                            " always, 1 block at random for 20 steps (hift.steps_per_group)"},
}
PACKAGES = {"lora": ("peft", "peft"), "badam": ("badam", "badam"),
            "galore": ("galore-torch", "galore_torch"), "lomo": ("lomo-optim", "lomo_optim"),
            "adalomo": ("lomo-optim", "lomo_optim")}


def peer_methods(spec: dict) -> dict[str, dict]:
    """The peers, each as its documentation advises (see the comments)."""
    return {
        # PEFT's LoRA on every attention and MLP projection of the blocks; alpha = 2r,
        # dropout 0.05; the LR the LoRA/QLoRA papers use at this size (adapters start at 0).
        "lora-r8": {"peer": "lora", "rank": 8, "alpha": 16, "dropout": 0.05,
                    "lr": spec["lora_lr"], "what": "LoRA r=8 adapters (peft)"},
        "lora-r16": {"peer": "lora", "rank": 16, "alpha": 32, "dropout": 0.05,
                     "lr": spec["lora_lr"], "what": "LoRA r=16 adapters (peft)"},
        # BAdam's BlockOptimizer: blocks = transformer layers, ascending, switching every
        # K = n / (B * D) steps (its README's adaptive rule: every block sees an equal share
        # of each epoch); a fresh classification head is kept active (active_modules).
        "badam": {"peer": "badam", "switch_mode": "ascending", "lr": None,
                  "what": "BAdam: one transformer layer at a time (badam)"},
        # GaLoreAdamW on the blocks' 2-D weights with its README's fine-tuning setting
        # (rank 4, scale 4, projection refreshed every 500 steps); AdamW on the rest.
        "galore": {"peer": "galore", "rank": 4, "scale": 4.0, "update_proj_gap": 500,
                   "proj_type": "std", "lr": None,
                   "what": "GaLore: AdamW state in a rank-4 gradient projection"},
        # LOMO: SGD fused into backward; its paper's config: lr 0.03, clip norm 1.0 (a
        # second backward pass computes the norm), no weight decay.
        "lomo": {"peer": "lomo", "lr": 0.03, "clip_grad_norm": 1.0,
                 "what": "LOMO: fused SGD update in backward, no state (lomo-optim)"},
        "adalomo": {"peer": "adalomo", "lr": 1e-3, "clip_grad_norm": 1.0,
                    "what": "AdaLomo: LOMO with factored second moments (lomo-optim)"},
    }


def _seeded(family: str, spec: dict) -> dict[str, dict]:
    """quality.per_seed's suites (the first seed's named ``family``), each seed in the
    base overrides (a peers suite runs the one seed it names)."""
    return {name: {**s, "base": merge(s["base"], [f"trainer.seed={s['seed']}"])}
            for name, s in quality.per_seed(family, spec, first_bare=True).items()}


# The quality suites' data, epochs, evaluation and seeds (bench/quality.py), a seed per
# suite. On SmolLM2 (generative, ~4 min a run here) only fpft, LISA and one setting of each
# peer fit the 30 minutes of a suite; HiFT's rows join them by a later `--only hift-k4
# --only hift-auto-x3` (2026-12-04: ~11 minutes a seed).
SUITES = {
    **_seeded("peers-minilm", {
        **quality.SUITES["quality-minilm"], "lora_lr": 5e-4,
        "title": "all-MiniLM-L6-v2, kinship relations of two couples (7 labels): HiFT"
                 " against the alternatives"}),
    **_seeded("peers-smollm2", {
        **quality.SUITES["quality-smollm2-seed42"], "seeds": quality.SEEDS, "lora_lr": 5e-4,
        "only": ("fpft", "lisa (hift)", "lora-r16", "badam", "galore", "lomo"),
        # LISA's cycle (30 blocks x 20 steps) is 3x the run: fpft's 200 steps, not a cycle
        # rounded up; its LR stays at the peak (hift steps the schedule at cycle ends).
        "after": {"lisa (hift)": ["trainer.epochs=null", "trainer.max_steps=200"]},
        "title": "SmolLM2-135M-Instruct, kinship relation of two couples in words"
                 " (generative): the alternatives"}),
    # The peers that finished their usual epochs before fpft's training time was up (LoRA
    # 0.6-0.7x fpft's step, BAdam 0.5x, LISA 0.6-0.8x), given 2x the epochs: their best
    # within fpft's time is then an equal-time comparison, as HiFT's (given 3x) is. GaLore
    # and LOMO already used all of fpft's time.
    **_seeded("peers-minilm-x2", {
        **quality.SUITES["quality-minilm"], "lora_lr": 5e-4,
        "longer": ("lora-r16", "badam", "lisa (hift)"), "times": 2,
        "only": ("fpft", "lora-r16-x2", "badam-x2", "lisa (hift)-x2"),
        "title": "all-MiniLM-L6-v2, kinship relations of two couples (7 labels): the"
                 " alternatives given 2x the epochs"}),
    **_seeded("peers-smollm2-x2", {
        **quality.SUITES["quality-smollm2-seed42"], "seeds": quality.SEEDS, "lora_lr": 5e-4,
        "longer": ("lora-r16", "badam", "lisa (hift)"), "times": 2,
        "only": ("fpft", "lora-r16-x2", "badam-x2", "lisa (hift)-x2"),
        "after": {"lisa (hift)-x2": ["trainer.epochs=null", "trainer.max_steps=400"]},
        "title": "SmolLM2-135M-Instruct, kinship relation of two couples in words"
                 " (generative): the alternatives given 2x the epochs"}),
}
QUICK = {  # fpft, LISA and every peer for 2 steps on the random-init tiny LLaMA (tests)
    "peers-tiny": {"title": "tiny random-init LLaMA (smoke test of the peers suite)",
                   "metric": "eval/loss", "higher_is_better": False, "epochs": 1,
                   "lora_lr": 2e-4,
                   # LISA in 2 steps, not one cycle of 4 blocks x 20 steps
                   "after": {"lisa (hift)": ["hift.m=2", "hift.steps_per_group=1"]},
                   "longer": ("lora-r8",), "times": 2,  # a peer given 2x the epochs
                   "only": ("fpft", "hift-auto-x3", "lisa (hift)", "lora-r8", "lora-r8-x2",
                            "badam", "galore", "lomo", "adalomo"),
                   "base": ["recipe=tiny", "data.max_samples=16", "trainer.batch_size=8",
                            "trainer.max_steps=null", "trainer.epochs=1",
                            "trainer.eval_every=epoch", "eval.show_samples=0"]},
}


def methods(spec: dict, every: bool = False) -> dict[str, dict]:
    """The suite's methods (``every``: all there are, beyond the suite's ``only``); a
    suite's ``longer`` methods also given ``times`` x the epochs, as ``<name>-x<times>``."""
    out = {name: {"kind": "hift", **m} for name, m in HIFT_METHODS.items()}
    out.update({name: {"kind": "peer", **m} for name, m in peer_methods(spec).items()})
    for name in spec.get("longer", ()):
        times = spec["times"]
        out[f"{name}-x{times}"] = {**out[name], "epochs_times": times,
                                   "what": f"{out[name]['what']}; given {times}x the epochs"}
    return {k: v for k, v in out.items() if every or k in spec.get("only", out)}


# ----------------------------------------------------------------------------- parent
def spawn(cmd: list[str], log_path: Path, env: dict) -> tuple[int, int]:
    """Run ``cmd``; its exit code and its peak RSS in bytes (``wait4``: this child's own)."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss * 1024  # KiB on Linux


def run_suite(spec: dict, runs_dir: Path, env: dict, start: float,
              only: list[str] | None = None) -> dict:
    """Every method of one peers suite (``only``: these, which may be any method, to run
    beside the suite's own), one process each; ratios to fpft's (which must be among the
    runs; ``compare`` is the caller's when ``only``)."""
    runs = {}
    chosen = {k: m for k, m in methods(spec, every=bool(only)).items() if not only or k in only}
    budget = (quality.budget_gib(spec["base"])
              if any(m.get("budget") for m in chosen.values()) else None)
    for name, method in chosen.items():
        if name in spec.get("after", {}):  # a suite's settings over the method's own
            method = {**method, "after": spec["after"][name]}
        run_dir = runs_dir / name.replace(" ", "_").replace("(", "").replace(")", "")
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        print(f"[{time.perf_counter() - start:6.0f} s] {runs_dir.name}/{name}", flush=True)
        runs[name] = r = run_method(method, spec, run_dir, env, budget)
        if "not_run" in r:
            print(f"         not run: {r['not_run']}", flush=True)
        else:
            print(f"         {r['mean_step_seconds']:.3f} s/step, peak RSS"
                  f" {r['peak_rss_gib']:.2f} GiB, best {r['best']['value']:.4f}, final"
                  f" {r['final']['value']:.4f}", flush=True)
    return {"kind": "peers", "title": spec["title"], "base": spec["base"],
            "metric": spec["metric"], "higher_is_better": spec["higher_is_better"],
            "epochs": spec["epochs"], "family": spec.get("family"), "seed": spec.get("seed"),
            "budget_gib": budget, "runs": runs,
            "comparison": None if only else compare(runs, spec["higher_is_better"])}


def run_method(method: dict, spec: dict, run_dir: Path, env: dict,
               budget: float | None = None) -> dict:
    log_path = run_dir.parent / f"{run_dir.name}.log"
    what = {"what": method["what"]}
    # More epochs than the suite's, then the suite's own settings for this method (after).
    extra = ([f"trainer.epochs={method['epochs_times'] * spec['epochs']}"]
             if method.get("epochs_times") else [])
    after = method.get("after", [])
    if method["kind"] == "hift":
        if method.get("budget"):
            extra.insert(0, f"hift.memory_budget={budget}")
        overrides = merge(spec["base"], method["overrides"], extra, after)
        cmd = [sys.executable, "-c", "import sys; from hift_cli.cli import main; sys.exit(main())",
               "train", *overrides, "trainer.save_model=false", "trainer.save_every=null",
               f"hydra.run.dir={run_dir}"]
        settings = {"overrides": merge(method["overrides"], extra, after)}
    else:
        package, module = PACKAGES[method["peer"]]
        if importlib.util.find_spec(module) is None:
            return {**what, "not_run": f"{package} is not installed (pip install -e"
                                       " '.[peers]')"}
        settings = {k: v for k, v in method.items() if k not in ("kind", "what", "after")}
        settings["package"] = f"{package} {importlib.metadata.version(package)}"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(settings),
               "--run-dir", str(run_dir), "--", *merge(spec["base"], extra, after)]
    code, rss = spawn(cmd, log_path, env)
    unavailable = run_dir / "unavailable.json"
    if unavailable.exists():
        return {**what, "settings": settings,
                "not_run": json.loads(unavailable.read_text())["reason"]}
    if code != 0:
        raise SystemExit(f"bench: {method['what']} failed (exit {code}); see {log_path}")
    # What the peer resolved at run time (e.g. BAdam's switch interval) joins its settings.
    summary = json.loads((run_dir / "summary.json").read_text())
    settings.update(summary.get("settings", {}))
    return {**what, "settings": settings, **method_record(
        collect(run_dir, spec["metric"], spec["higher_is_better"], peak_rss=rss),
        spec["epochs"])}


def _at_epoch(points: list[dict], epoch: float) -> dict:
    """The evaluation at the end of ``epoch`` (a run rounded up to whole HiFT cycles goes
    on past it; its final evaluation is reported separately)."""
    return next((c for c in points if c["epoch"] >= epoch - 1e-9), points[-1])


def method_record(run: dict, epochs_wanted: int) -> dict:
    """What a peers suite keeps of a method's run (:func:`collect.collect`): speed, memory,
    the eval curve, and the metric after one epoch, after ``epochs_wanted``, the final and
    the best."""
    evals = [point(c) for c in run["evals"]]
    out = {key: run[key] for key in ("steps", "train_seconds", "tokens", "mean_step_seconds",
                                     "tokens_per_second", "peak_rss_gib",
                                     "params_updated_per_step", "before")}
    out.update(curve=[point(c) for c in run["curve"]], epoch1=_at_epoch(evals, 1),
               epochs=_at_epoch(evals, epochs_wanted), final=evals[-1],
               best=point(run["best"]))
    return out


RATIOS = ("mean_step_seconds", "tokens_per_second", "peak_rss_gib", "params_updated_per_step",
          "train_seconds")


def compare(runs: dict[str, dict], higher_is_better: bool) -> dict:
    """Every figure as a ratio to fpft's; the metric at equal wall-clock: the shortest
    run's training time, interpolated on each run's eval curve (from the eval before
    training, at 0 s, through the per-epoch ones); and the best evaluation within fpft's
    training time (a method slower than fpft, or one given more epochs, is cut there)."""
    ran = {k: r for k, r in runs.items() if "not_run" not in r}
    base = ran["fpft"]
    equal = min(r["train_seconds"] for r in ran.values())
    for r in ran.values():
        # Within every curve: the last evaluation comes at the end of training.
        r["equal_wallclock"] = interpolate([(c["seconds"], c["value"]) for c in r["curve"]],
                                           equal)
    for r in ran.values():
        # fpft's whole training time: the best evaluation each method had reached by then
        # (the eval before training counts, at 0 s).
        done = [c["value"] for c in r["curve"] if c["seconds"] <= base["train_seconds"] + 1e-9]
        r["at_fpft_time"] = (max if higher_is_better else min)(done) if done else None
    for r in ran.values():
        q = {key: r[key] / base[key] for key in RATIOS}
        for key in ("epoch1", "epochs", "final", "best"):
            q[key] = r[key]["value"] / base[key]["value"]
        q["equal_wallclock"] = r["equal_wallclock"] / base["equal_wallclock"]
        if r["at_fpft_time"] is not None:
            q["at_fpft_time"] = r["at_fpft_time"] / base["at_fpft_time"]
        r["ratio_to_fpft"] = q
    return {"equal_wallclock_seconds": equal, "fpft_seconds": base["train_seconds"]}


def interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    """y at x on the polyline through ``points`` (sorted by x); None outside it."""
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    if points and x == points[-1][0]:
        return points[-1][1]
    return None


def markdown(suite: str, s: dict, plots: str = "") -> list[str]:
    metric = s["metric"].removeprefix("eval/")
    better = "higher" if s["higher_is_better"] else "lower"
    E, equal = s["epochs"], s["comparison"]["equal_wallclock_seconds"]
    lines = [f"### {suite}: {s['title']}", "",
             f"Measured {s['date']}, {s['minutes']:.0f} min for the suite, every method in its"
             f" own process, one after another. `{' '.join(s['base'])}`: {E} epochs for every"
             f" method, the same batches in the same order, eval after every epoch; {metric},"
             f" {better} is better. Equal wall-clock: {equal:.1f}"
             " s of training (the fastest method's total), interpolated between evaluations."
             " ×: ratio to fpft in this invocation. A HiFT run is rounded up to whole cycles"
             " of its groups, so it may go on past the last epoch: its final column says where"
             " it stopped.", "",
             f"| method | params updated / step | ×fpft | step s | ×fpft | tokens/s | ×fpft"
             f" | peak RSS GiB | ×fpft | {metric} @1 epoch | ×fpft | @{E} epochs | ×fpft"
             f" | best (epoch) | ×fpft | @equal wall-clock | ×fpft | best within fpft's time"
             f" | ×fpft | final (epochs) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in s["runs"].items():
        if "not_run" in r:
            lines.append(f"| {name} | not run here: {r['not_run']} |" + " |" * 18)
            continue
        q = r["ratio_to_fpft"]
        at = r.get("at_fpft_time")
        at = f"{at:.4f} | {q['at_fpft_time']:.3f}" if at is not None else "— | —"
        lines.append(
            f"| {name} | {r['params_updated_per_step'] / 1e6:.2f}M |"
            f" {q['params_updated_per_step']:.3f} | {r['mean_step_seconds']:.3f} |"
            f" {q['mean_step_seconds']:.2f} | {r['tokens_per_second']:.0f} |"
            f" {q['tokens_per_second']:.2f} | {r['peak_rss_gib']:.2f} | {q['peak_rss_gib']:.2f} |"
            f" {r['epoch1']['value']:.4f} | {q['epoch1']:.3f} | {r['epochs']['value']:.4f} |"
            f" {q['epochs']:.3f} | {r['best']['value']:.4f} ({r['best']['epoch']:g}) |"
            f" {q['best']:.3f} | {r['equal_wallclock']:.4f} | {q['equal_wallclock']:.3f} |"
            f" {at} | {r['final']['value']:.4f} ({r['final']['epoch']:g}) |")
    if s.get("later"):
        lines += ["", "Run in a later invocation (same machine type, nothing else running) and"
                      " compared with this one's fpft: " + ", ".join(
                          f"{m} ({d})" for m, d in s["later"].items()) + "."]
    lines += ["", "Settings per method (each as its documentation advises):", ""]
    for name, r in s["runs"].items():
        settings = {k: v for k, v in r.get("settings", {}).items() if k != "what"}
        lines.append(f"- **{name}**: {r['what']}; `{json.dumps(settings)}`")
    if s.get("plot"):
        lines += ["", f"![{suite}]({plots}{s['plot']})"]
    return lines + [""]


def over_seeds(suites: list[dict]) -> dict:
    """One family's per-seed suites combined: per method, mean ± std over the seeds it ran
    on of the best, the value at E epochs, the best within fpft's time and the step time,
    each with the quality suites' verdict against fpft (≈ within the spread)."""
    higher = suites[0]["higher_is_better"]
    keys = {"best": lambda r: r["best"]["value"], "epochs": lambda r: r["epochs"]["value"],
            "at_fpft_time": lambda r: r.get("at_fpft_time"),
            "step_seconds": lambda r: r["mean_step_seconds"]}
    methods_ = {}
    for s in suites:
        for name, r in s["runs"].items():
            if "not_run" not in r:
                methods_.setdefault(name, []).append((s["seed"], r))
    out = {}
    for name, seeded in methods_.items():
        row = {"seeds": sorted(seed for seed, _ in seeded)}
        for key, get in keys.items():
            values = [get(r) for _, r in seeded]
            if all(v is not None for v in values):
                row[key] = quality.spread(values)
        out[name] = row
    base = out["fpft"]
    for row in out.values():
        row["vs"] = {k: quality.verdict(row[k], base[k], higher)
                     for k in ("best", "epochs", "at_fpft_time") if k in row and k in base}
        row["ratio"] = {k: row[k]["mean"] / base[k]["mean"] for k in keys
                        if k in row and k in base and base[k]["mean"]}
    return {"higher_is_better": higher, "epochs": suites[0]["epochs"],
            "metric": suites[0]["metric"], "methods": out}


def over_seeds_markdown(family: str, agg: dict, names: list[str]) -> list[str]:
    metric, E = agg["metric"].removeprefix("eval/"), agg["epochs"]
    lines = [f"#### {family}, over seeds", "",
             f"Mean ± standard deviation over the seeds each method ran on ({metric}, "
             f"{'higher' if agg['higher_is_better'] else 'lower'} is better); `vs`: ≈ within"
             " the spread (means closer than the two standard deviations together), + / −"
             " better / worse than fpft beyond it; ×: ratio of means to fpft's.", "",
             f"| method | seeds | best | ×fpft | vs | @{E} epochs | ×fpft | vs"
             " | best within fpft's time | ×fpft | vs | step s | ×fpft |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    pm = quality.mean_std
    for name in names:
        row = agg["methods"].get(name)
        if row is None:
            continue
        q, v = row["ratio"], row["vs"]
        cells = [f"{pm(row[k])} | {q[k]:.3f} | {v[k]}" if k in row else "— | — | —"
                 for k in ("best", "epochs", "at_fpft_time")]
        lines.append(f"| {name} | {', '.join(map(str, row['seeds']))} | {' | '.join(cells)} |"
                     f" {row['step_seconds']['mean']:.3f} | {q['step_seconds']:.2f} |")
    return lines + [""]


def plot(suite: str, s: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = s["metric"].removeprefix("eval/")
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4), dpi=100)
    ran = {k: r for k, r in s["runs"].items() if "not_run" not in r}
    for name, r in ran.items():
        style = dict(lw=2.4, color="black") if name == "fpft" else dict(lw=1.3)
        if name.startswith(("hift", "lisa")):
            style["ls"] = "--"
        epochs = [c["epoch"] or 0 for c in r["curve"]]
        values = [c["value"] for c in r["curve"]]
        axes[0].plot(epochs, values, marker="o", ms=3, label=name, **style)
        axes[1].plot([c["seconds"] for c in r["curve"]], values, marker="o", ms=3, label=name,
                     **style)
    names = list(ran)
    axes[2].barh(names, [ran[n]["peak_rss_gib"] for n in names], color="tab:gray")
    axes[0].set(xlabel="epoch", ylabel=f"eval {metric}", title=f"eval {metric} per epoch")
    axes[1].set(xlabel="training seconds (eval excluded)", ylabel=f"eval {metric}",
                title="against wall-clock")
    axes[2].set(xlabel="peak RSS of the process, GiB (CPU run)", title="host memory")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{suite}: {s['title']}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ------------------------------------------------------- device memory for LLaMA-7B
SETTING_7B = ["recipe=llama7b_alpaca", "trainer.batch_size=8", "data.max_length=512",
              "trainer.precision=bf16"]


def memory_7b() -> dict:
    """Device memory of each method for LLaMA-7B at batch 8 x 512 in bf16 (weights,
    gradients and AdamW states in bf16; the recipe's gradient checkpointing for all).

    fpft, HiFT and LISA: ``hift memprofile``'s estimate. The peers: their documented memory
    models on the same parameter shapes, with memprofile's activations (the full graph's
    for methods that back-propagate to the embeddings; BAdam's lowest block active for
    BAdam).
    """
    auto = quality.estimate(SETTING_7B)  # the recipe: k=auto under its 24 GiB budget
    m1 = quality.estimate([*SETTING_7B, "hift.m=1"])
    lisa = quality.estimate([*SETTING_7B, "hift.strategy=random", "hift.m=1",
                             "hift.always_active=[embeddings,head]"])
    return peer_memory(auto, m1, lisa, _llama7b_shapes())


def _llama7b_shapes() -> dict:
    """Parameter shapes of the LLaMA-7B preset (a meta model: no download, no memory)."""
    from torch import nn

    from hift_cli.config import compose
    from hift_cli.grouping import find_units
    from hift_cli.memory import meta_model

    model = meta_model(compose(SETTING_7B))
    units = find_units(model)
    blocks = [u for u in units if u.name.startswith("block.")]
    in_blocks = {id(p) for u in blocks for p in u.params.values()}
    linears = [tuple(m.weight.shape) for m in model.modules()
               if isinstance(m, nn.Linear) and id(m.weight) in in_blocks]
    params = [tuple(p.shape) for p in model.parameters()]
    return {"block_linears": linears, "params": params,
            "block_numel": max(u.numel for u in blocks)}


def peer_memory(auto: dict, m1: dict, lisa: dict, shapes: dict, lora_ranks=(8, 16),
                galore_rank: int = 1024) -> dict:
    """The table: per method, bytes of weights / gradients / optimizer states / activations
    / other and how each figure was obtained."""
    fpft = auto["fpft"]
    N = sum(math.prod(s) for s in shapes["params"])
    W, A = fpft["weights"], fpft["activations"]
    largest = max(math.prod(s) for s in shapes["params"])
    block0 = next(g for g in m1["per_group"] if g["group"] == "block.0")["activations"]
    rows = {}

    def row(name, source, weights, gradients, states, activations, other=0):
        rows[name] = {"weights": weights, "gradients": gradients, "optimizer_states": states,
                      "activations": activations, "other": other,
                      "total": weights + gradients + states + activations + other,
                      "source": source}

    def memprofile_row(name, report, column):
        # HiFT: the peak group's own breakdown (the report's hift column takes each row's
        # largest over groups, which need not add up to the peak).
        c = report[column] if column == "fpft" else next(
            g for g in report["per_group"] if g["group"] == report["hift_peak_group"])
        row(name, f"hift memprofile ({report['groups']} groups, peak group {c['group']})"
            if column == "hift" else "hift memprofile", c["weights"], c["gradients"],
            c["optimizer_states"] + c["fp32_masters"], c["activations"], c["other"])

    memprofile_row("fpft", auto, "fpft")
    memprofile_row("hift (k=auto, 24 GiB)", auto, "hift")
    memprofile_row("hift-m1", m1, "hift")
    memprofile_row("lisa (hift)", lisa, "hift")
    for r in lora_ranks:
        adapters = r * sum(a + b for a, b in shapes["block_linears"])
        # peft keeps adapters in fp32 on a bf16 model: weight 4 + grad 4 + AdamW 8 bytes.
        row(f"lora-r{r}", f"formula: bf16 weights + {adapters / 1e6:.1f}M fp32 adapter params"
            " x (4 weight + 4 grad + 8 AdamW) bytes + fpft's activations",
            W + 4 * adapters, 4 * adapters, 8 * adapters, A)
    P = shapes["block_numel"]
    # BAdam: an fp32 copy of the active block, its bf16 and fp32 grads, fp32 AdamW state.
    row("badam", "formula: bf16 weights + one block's fp32 copy (4) + bf16/fp32 grads (2+4)"
        " + fp32 AdamW (8) bytes per parameter + activations with block 0 active",
        W + 4 * P, 6 * P, 8 * P, block0)
    projected = sum(2 * galore_rank * max(a, b) for a, b in shapes["block_linears"])
    projection = sum(galore_rank * min(a, b) for a, b in shapes["block_linears"])
    other_numel = N - sum(a * b for a, b in shapes["block_linears"])
    row(f"galore (r={galore_rank})", f"formula: GaLoreAdamW rank {galore_rank} (its README's"
        " 7B rank): bf16 weights + all bf16 grads + AdamW state on the r x n projected"
        " gradients of the blocks' matrices and full state on the rest + projections",
        W, 2 * N, 2 * (projected + 2 * other_numel), A, 2 * projection)
    row(f"galore 8-bit per-layer (r={galore_rank})", "formula: its README's 24 GB recipe:"
        " gradients freed layer by layer (the largest matrix's at a time), 8-bit states",
        W, 2 * largest, projected + 2 * other_numel, A, 2 * projection)
    # LOMO: the update is fused into backward: at most two parameters' gradients at once.
    row("lomo", "formula: bf16 weights + two parameters' bf16 gradients (fused update),"
        " no state + fpft's activations", W, 2 * 2 * largest, 0, A)
    factored = sum((a + b) if len(s) == 2 else math.prod(s)
                   for s in shapes["params"] for a, b in [(s + (1,))[:2]])
    row("adalomo", "formula: LOMO + fp32 factored second moments (rows + columns)",
        W, 2 * 2 * largest, 4 * factored, A)
    return {"setting": " ".join(SETTING_7B), "params": N, "rows": rows}


def memory_markdown(m: dict) -> list[str]:
    gib = 2**30
    lines = [f"Device memory for LLaMA-7B ({m['params'] / 1e9:.2f}B parameters) at"
             f" `{m['setting']}` (batch 8 x 512, bf16 weights, gradients and AdamW states,"
             " gradient checkpointing), GiB:", "",
             "| method | weights | gradients | optimizer states | activations | other | total"
             " | fits 24 GiB | how |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in m["rows"].items():
        lines.append(
            f"| {name} | {r['weights'] / gib:.2f} | {r['gradients'] / gib:.2f} |"
            f" {r['optimizer_states'] / gib:.2f} | {r['activations'] / gib:.2f} |"
            f" {r['other'] / gib:.2f} | **{r['total'] / gib:.2f}** |"
            f" {'yes' if r['total'] <= 24 * gib else 'no'} | {r['source']} |")
    return lines + [""]


def plot_memory(m: dict, path: Path) -> None:
    """Stacked bars: each method's device memory for LLaMA-7B, by category, with 24 GiB."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(m["rows"])[::-1]
    fig, ax = plt.subplots(figsize=(10, 0.42 * len(names) + 1.6), dpi=100)
    left = [0.0] * len(names)
    for key in ("weights", "gradients", "optimizer_states", "activations", "other"):
        widths = [m["rows"][n][key] / 2**30 for n in names]
        ax.barh(names, widths, left=left, label=key.replace("_", " "))
        left = [a + b for a, b in zip(left, widths)]
    ax.axvline(24, color="black", ls="--", lw=1)
    ax.text(24.3, len(names) - 0.6, "24 GiB", fontsize=8)
    ax.set(xlabel="GiB of device memory (hift memprofile; the peers' documented models)",
           title="LLaMA-7B, batch 8 x 512, bf16: device memory per method")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ------------------------------------------------------------------------------ child
class Unavailable(Exception):
    """This peer cannot run here (the reason goes into the table)."""


def child(settings: dict, run_dir: Path, overrides: list[str]) -> int:
    """Train one peer through hift's own loop (``hift train``'s task with the peer's update
    rule): hift's batches, loss weighting, metrics rows, evaluation and summary."""
    from hift_cli.config import compose
    from hift_cli.run import run_training

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    overrides = [*overrides, "hift.strategy=fpft", "trainer.save_model=false",
                 "trainer.save_every=null"]
    cfg = compose(overrides)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:  # fpft's trainer: the model, the batches, the evaluator, the steps from epochs
        run_training(cfg, run_dir, update=lambda trainer: PEERS[settings["peer"]](
            trainer, settings))
    except Unavailable as e:
        (run_dir / "unavailable.json").write_text(json.dumps({"reason": str(e)}))
    return 0


class Peer(Update):
    """A torch optimizer over some parameters, stepped like hift's fpft step: the
    window's micro-batches, each loss scaled by its weight, clipped at
    ``trainer.max_grad_norm``, the LR schedule stepped every step."""

    def __init__(self, trainer, settings: dict):
        self.trainer, self.settings = trainer, settings
        self.cfg = trainer.cfg
        self.lr_value = settings.get("lr") or self.cfg.optimizer["lr"]
        self.weight_decay = self.cfg.optimizer.get("weight_decay", 0.0)

    def schedule(self, optimizer) -> None:
        from transformers import get_scheduler

        t, steps = self.cfg.trainer, self.trainer.plan.max_steps  # fpft's: a cycle a step
        self.scheduler = get_scheduler(t.lr_scheduler, optimizer,
                                       num_warmup_steps=t.warmup(steps),
                                       num_training_steps=steps)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def summary(self) -> dict:
        return {"settings": self.settings}  # with what the peer resolved at run time

    def forward_backward(self, window) -> float:
        from hift_cli.models import autocast

        total = 0.0
        for batch, weight in zip(window.batches, window.weights):
            with autocast(self.cfg.trainer.precision, self.trainer.device):
                loss = self.model(**batch).loss * weight
            loss.backward()
            total += loss.item()
        return total

    def step(self, step, stop, window) -> StepResult:
        import torch

        lr = self.lr()
        loss = self.forward_backward(window)
        params = [p for g in self.optimizer.param_groups for p in g["params"]
                  if p.grad is not None]
        norm = self.cfg.trainer.max_grad_norm
        torch.nn.utils.clip_grad_norm_(params, norm if norm is not None else float("inf"))
        n = self.updated()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss, lr, finite=True, updated=n)

    def updated(self) -> int:
        return sum(p.numel() for g in self.optimizer.param_groups for p in g["params"]
                   if p.grad is not None)


def _block_units(trainer):
    return [u for u in trainer.units if u.name.startswith("block.")]


class LoRA(Peer):
    def __init__(self, trainer, settings):
        super().__init__(trainer, settings)
        import torch
        from peft import LoraConfig, get_peft_model

        in_blocks = {id(p) for u in _block_units(trainer) for p in u.params.values()}
        targets = [name for name, m in trainer.model.named_modules()
                   if isinstance(m, torch.nn.Linear) and id(m.weight) in in_blocks]
        classify = bool(trainer.labels.names)
        config = LoraConfig(
            r=settings["rank"], lora_alpha=settings["alpha"], lora_dropout=settings["dropout"],
            target_modules=targets, task_type="SEQ_CLS" if classify else "CAUSAL_LM")
        self.model = get_peft_model(trainer.model, config)
        trainer.model = self.model  # the evaluator runs the adapted model
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=self.lr_value,
                                           weight_decay=self.weight_decay)
        self.schedule(self.optimizer)


class BAdam(Peer):
    def __init__(self, trainer, settings):
        super().__init__(trainer, settings)
        import torch
        from badam import BlockOptimizer

        self.model = trainer.model
        names = {id(p): n for n, p in self.model.named_parameters()}
        blocks = [[os.path.commonprefix([names[id(p)] for p in u.params.values()])]
                  for u in _block_units(trainer)]
        # A freshly initialised classification head must train: BAdam's active_modules.
        head = [u for u in trainer.units if (u.parent or u.name) == "head"]  # or its sub-units
        active = ([names[id(p)] for u in head for p in u.params.values()]
                  if trainer.labels.names else [])
        n, t = len(trainer.train_set), self.cfg.trainer
        switch = max(1, round(n / (t.batch_size * t.grad_accum * len(blocks))))
        settings.update(switch_block_every=switch, blocks=len(blocks),
                        active_modules=len(active))
        base = torch.optim.AdamW(self.model.parameters(), lr=self.lr_value,
                                 weight_decay=self.weight_decay)
        self.optimizer = BlockOptimizer(
            base_optimizer=base, named_parameters_list=list(self.model.named_parameters()),
            block_prefix_list=blocks, switch_block_every=switch,
            switch_mode=settings["switch_mode"], active_modules=active, verbose=0)
        self.schedule(self.optimizer)


class GaLore(Peer):
    def __init__(self, trainer, settings):
        super().__init__(trainer, settings)
        from galore_torch import GaLoreAdamW

        self.model = trainer.model
        for p in self.model.parameters():
            p.requires_grad_(True)
        projected = [p for u in _block_units(trainer) for p in u.params.values() if p.ndim == 2]
        ids = {id(p) for p in projected}
        rest = [p for p in self.model.parameters() if id(p) not in ids]
        self.optimizer = GaLoreAdamW([
            {"params": [p for p in rest if p.ndim >= 2], "weight_decay": self.weight_decay},
            {"params": [p for p in rest if p.ndim < 2], "weight_decay": 0.0},
            {"params": projected, "weight_decay": self.weight_decay, "rank": settings["rank"],
             "update_proj_gap": settings["update_proj_gap"], "scale": settings["scale"],
             "proj_type": settings["proj_type"]},
        ], lr=self.lr_value)
        self.schedule(self.optimizer)


class LOMO(Peer):
    """Fused SGD (or AdaLomo) in backward: ``grad_norm`` (a first backward pass, for the
    clip coefficient) then ``fused_backward`` (updates each parameter as its gradient
    arrives). The LR is read from a schedule on a stand-in optimizer."""

    def __init__(self, trainer, settings):
        super().__init__(trainer, settings)
        import torch
        from lomo_optim import AdaLomo, Lomo

        if self.cfg.trainer.grad_accum != 1:
            raise Unavailable("LOMO updates inside backward: it has no gradient accumulation")
        self.model = trainer.model
        for p in self.model.parameters():
            p.requires_grad_(True)
        kind = Lomo if settings["peer"] == "lomo" else AdaLomo
        try:
            self.optimizer = kind(self.model, lr=self.lr_value,
                                  clip_grad_norm=settings["clip_grad_norm"], weight_decay=0.0)
        except (AssertionError, RuntimeError) as e:  # AdaLomo: state made with .cuda()
            if torch.cuda.is_available():
                raise
            raise Unavailable(f"{kind.__name__} needs CUDA (its state is allocated with"
                              f" .cuda(): {str(e).splitlines()[0]})") from None
        self.stand_in = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=self.lr_value)
        self.schedule(self.stand_in)

    def step(self, step, stop, window):
        ((batch, weight),) = zip(window.batches, window.weights)
        from hift_cli.models import autocast

        lr = self.lr()
        with autocast(self.cfg.trainer.precision, self.trainer.device):
            loss = self.model(**batch).loss * weight
        if self.optimizer.clip_grad_norm:
            self.optimizer.grad_norm(loss)
        self.optimizer.fused_backward(loss, lr)
        self.stand_in.step()
        self.scheduler.step()
        return StepResult(loss.item(), lr, finite=True,
                          updated=sum(p.numel() for p in self.model.parameters()))


PEERS = {"lora": LoRA, "badam": BAdam, "galore": GaLore, "lomo": LOMO, "adalomo": LOMO}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one peer's training run (bench/compare.py"
                                     " calls it; see the module docstring)")
    parser.add_argument("--child", required=True, help="the method's settings, JSON")
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    return child(json.loads(args.child), args.run_dir, args.overrides)


if __name__ == "__main__":
    sys.exit(main())
