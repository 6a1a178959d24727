"""``make bench``: full fine-tuning (fpft) and HiFT side by side, measured in one run.

Each configuration trains in its own ``hift train`` process (so peak RSS is its own) from
the same pretrained weights on the same data in the same order. From every run's
``metrics.jsonl``, ``summary.json`` and ``memory_report.json`` it takes:

- mean step time (all steps, whole cycles) and tokens/s over the training steps only
  (evaluation excluded), peak RSS of the process;
- eval loss at equal steps (the end of every run; with the same data order that is also
  equal tokens and equal epochs), at equal tokens (the smallest total any run reached)
  and at equal wall-clock (the training time of the fastest run), the last two linearly
  interpolated between the runs' periodic evaluations;
- every figure as a ratio to fpft's, measured in the same invocation.

The noise yardstick is the same HiFT configuration run with a second seed (data order and
the random strategy's orders change); the three strategies are "within noise" when their
spread of final eval loss is no larger than that seed-to-seed difference.

The ``quality-*`` suites (bench/quality.py) judge quality per epoch instead: the same
epochs for every configuration, eval after every epoch, best epoch and final, with
``hift.k=auto`` under a budget fpft does not fit and always-active heads.

The ``peers-*`` suites (bench/peers.py) put LoRA, BAdam, GaLore, LOMO and LISA's sampling
beside fpft and HiFT: same batches, same epochs, same evaluation, one process each, with each
method's device memory for LLaMA-7B beside them (their own docs block).

Writes ``bench/results/<name>.json``, ``<name>.md`` and ``<name>-<suite>.png`` and, unless
``--no-docs``, the measured block of ``docs/benchmarks.md``.

    python bench/compare.py                      # what `make bench` runs (every suite)
    python bench/compare.py --suite strategies-minilm   # one suite (each <= 30 min, 2 cores)
    python bench/compare.py --quick --out /tmp/b --no-docs   # tiny model, seconds (tests)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402  (bench/peers.py: LoRA, BAdam, GaLore, LOMO, LISA beside HiFT)
from collect import collect  # noqa: E402  (bench/collect.py: one run read back)
from peers import interpolate, merge  # noqa: E402  (shared with the peers suites)
import quality  # noqa: E402  (bench/quality.py: the per-epoch quality suites)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DOCS = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
PEERS_BEGIN, PEERS_END = "<!-- peers:begin -->", "<!-- peers:end -->"

STRATEGIES = ("bottom2up", "top2down", "random")
M1 = ["hift.k=null", "hift.m=1"]
K4 = ["hift.k=4", "hift.m=null"]


def _configs(seed_variant: list[str]) -> dict[str, list[str]]:
    """fpft, the three strategies at m=1 and at k=4, and one configuration on a 2nd seed."""
    configs = {"fpft": ["hift.strategy=fpft"]}
    for label, shape in (("m1", M1), ("k4", K4)):
        for strategy in STRATEGIES:
            configs[f"{strategy}-{label}"] = [f"hift.strategy={strategy}", *shape]
    configs["bottom2up-k4-seed2"] = ["hift.strategy=bottom2up", *K4, *seed_variant]
    return configs


# The strategies side by side, with speed and memory, in the quality suites' MiniLM regime
# (bench/quality.py): 7 epochs of 100 steps, every configuration's eval after every epoch;
# 700 steps are 50 cycles of m=1's 14 groups and 175 of k=4. The 2026-11-29 suites this
# replaces (`minilm`: 12-relation kinship in one epoch, where only fpft learnt; `smollm2`:
# 64 steps, 2 cycles of m=1) are in bench/results/cpu-2026-11-29.json.
SUITES = {
    "strategies-minilm": {
        "title": "all-MiniLM-L6-v2, kinship relation of two couples (7 labels): strategies,"
                 " speed and memory",
        "base": quality.MINILM,
        "configs": _configs(["trainer.seed=2"]),
    },
}
QUICK = {  # the same code path on the random-init tiny LLaMA: seconds (tests)
    "tiny": {
        "title": "tiny random-init LLaMA (smoke test of the benchmark itself)",
        "base": ["recipe=tiny", "trainer.max_steps=6", "trainer.batch_size=4",
                 "trainer.eval_every=3", "trainer.lr_scheduler=constant"],
        "configs": {"fpft": ["hift.strategy=fpft"],
                    "bottom2up-k3": ["hift.strategy=bottom2up", "hift.k=3"],
                    "top2down-k3": ["hift.strategy=top2down", "hift.k=3"],
                    "bottom2up-k3-seed2": ["hift.strategy=bottom2up", "hift.k=3",
                                           "trainer.seed=2"]},
    },
}


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1"}


def train(run_dir: Path, overrides: list[str]) -> None:
    """Train one configuration in a fresh process (its log beside the run dir)."""
    cmd = [sys.executable, "-c", "import sys; from hift_cli.cli import main; sys.exit(main())",
           "train", *overrides, "trainer.save_model=false", "trainer.save_every=null",
           f"hydra.run.dir={run_dir}"]
    with open(run_dir.parent / f"{run_dir.name}.log", "w") as log:
        code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=ENV, cwd=ROOT)
    if code != 0:
        raise SystemExit(f"bench: `hift train {' '.join(overrides)}` failed (exit {code});"
                         f" see {run_dir.parent / run_dir.name}.log")


def run_one(run_dir: Path, overrides: list[str]) -> dict:
    """Train one configuration; returns what the comparison needs."""
    train(run_dir, overrides)
    return record(collect(run_dir))


def record(run: dict) -> dict:
    """What the strategies suites keep of a run (:func:`collect.collect`): speed, memory,
    the eval loss curve (with training seconds and tokens) and the training loss."""
    curve = [{"step": c["step"], "seconds": c["seconds"], "tokens": c["tokens"],
              "eval_loss": c["value"]} for c in run["curve"]]
    out = {key: run[key] for key in ("steps", "groups", "mean_step_seconds", "train_seconds",
                                     "tokens", "tokens_per_second", "peak_rss_gib")}
    out.update(epochs=run["epochs_trained"], eval_loss=curve[-1]["eval_loss"],
               eval_curve=curve, train_loss=run["train_loss"])
    out.update({k: run[k] for k in ("eval_accuracy", "eval_accuracy_before") if k in run})
    return out


def compare(runs: dict[str, dict]) -> dict:
    """Equal-steps / tokens / wall-clock losses and every figure as a ratio to fpft's."""
    equal_tokens = min(r["tokens"] for r in runs.values())
    equal_seconds = min(r["train_seconds"] for r in runs.values())
    base = runs["fpft"]
    for r in runs.values():
        curve = r["eval_curve"]
        r["eval_loss_equal_steps"] = interpolate(
            [(p["step"], p["eval_loss"]) for p in curve], base["steps"])
        r["eval_loss_equal_tokens"] = interpolate(
            [(p["tokens"], p["eval_loss"]) for p in curve], equal_tokens)
        r["eval_loss_equal_wallclock"] = interpolate(
            [(p["seconds"], p["eval_loss"]) for p in curve], equal_seconds)
    for r in runs.values():
        r["ratio_to_fpft"] = {
            key: r[key] / base[key] for key in (
                "mean_step_seconds", "tokens_per_second", "peak_rss_gib", "train_seconds",
                "eval_loss", "eval_loss_equal_steps", "eval_loss_equal_tokens",
                "eval_loss_equal_wallclock")
            if r.get(key) is not None and base.get(key)}
    noise = None
    seeded = [name for name in runs if name.endswith("-seed2")]
    if seeded:
        twin = seeded[0].removesuffix("-seed2")
        noise = abs(runs[seeded[0]]["eval_loss"] - runs[twin]["eval_loss"])
    # Strategies side by side, per grouping ("<strategy>-<grouping>" at fpft's step count).
    by_grouping: dict[str, list[float]] = {}
    for name, r in runs.items():
        strategy, _, grouping = name.partition("-")
        if strategy in STRATEGIES and grouping and "-" not in grouping \
                and r["steps"] == base["steps"]:
            by_grouping.setdefault(grouping, []).append(r["eval_loss"])
    spread = {g: max(v) - min(v) for g, v in by_grouping.items() if len(v) > 1}
    return {"equal_tokens": equal_tokens, "equal_wallclock_seconds": equal_seconds,
            "seed_noise_eval_loss": noise, "strategy_spread_eval_loss": spread,
            "strategies_within_noise": None if noise is None else
            {g: v <= noise for g, v in spread.items()}}


def machine() -> dict:
    import torch

    cpu = platform.processor() or ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def plot(suite: str, title: str, runs: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), dpi=100)
    for name, r in runs.items():
        style = dict(lw=2.2, color="black") if name == "fpft" else dict(lw=1.2)
        if name.endswith("seed2"):
            style["ls"] = ":"
        curve = r["eval_curve"]
        axes[0].plot([p["step"] for p in curve], [p["eval_loss"] for p in curve],
                     marker="o", ms=3, label=name, **style)
        axes[1].plot([p["seconds"] for p in curve], [p["eval_loss"] for p in curve],
                     marker="o", ms=3, label=name, **style)
        steps, losses = zip(*r["train_loss"])
        window = max(1, len(losses) // 16)
        smooth = [sum(losses[max(0, i - window + 1): i + 1]) / len(losses[max(0, i - window + 1):
                  i + 1]) for i in range(len(losses))]
        axes[2].plot(steps, smooth, label=name, **style)
    axes[0].set(xlabel="step", ylabel="eval loss", title="eval loss vs step")
    axes[1].set(xlabel="training seconds (eval excluded)", ylabel="eval loss",
                title="eval loss vs wall-clock")
    axes[2].set(xlabel="step", ylabel="train loss (moving mean)", title="train loss")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{suite}: {title}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def markdown(result: dict, name: str, plots: str = "") -> str:
    """The results as markdown; ``plots``: the plots' folder relative to where it is shown."""
    m = result["machine"]
    lines = [f"Measured by `make bench` on {m['cpu'] or 'an unnamed CPU'} ({m['cores']} cores),"
             f" torch {m['torch']}, Python {m['python']}; each suite's configurations ran one"
             f" after another in one invocation. Raw numbers: `{name}.json` beside the plots.", ""]
    for suite, s in result["suites"].items():
        if s.get("kind") == "quality":
            lines += quality.markdown(suite, s, plots)
            continue
        if s.get("kind") == "peers":
            continue  # their own block (peers_markdown)
        c = s["comparison"]
        lines += [f"### {suite}: {s['title']}", "",
                  f"Measured {s['date']}, {s['minutes']:.0f} min for the suite.", "",
                  f"`{' '.join(s['base'])}`; {next(iter(s['runs'].values()))['steps']} steps"
                  f" each, about {s['runs']['fpft']['epochs']:.2f} epoch. Equal tokens:"
                  f" {c['equal_tokens']:.0f}; equal wall-clock: {c['equal_wallclock_seconds']:.1f}"
                  " s of training (the fastest run's total).", "",
                  "| config | groups | step s | ×fpft | tokens/s | ×fpft | peak RSS GiB | ×fpft"
                  " | eval loss (equal steps) | ×fpft | equal tokens | ×fpft"
                  " | equal wall-clock | ×fpft |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for config, r in s["runs"].items():
            q = r["ratio_to_fpft"]
            wall = r["eval_loss_equal_wallclock"]
            lines.append(
                f"| {config} | {r['groups']} | {r['mean_step_seconds']:.3f} |"
                f" {q['mean_step_seconds']:.3f} | {r['tokens_per_second']:.0f} |"
                f" {q['tokens_per_second']:.2f} | {r['peak_rss_gib']:.2f} |"
                f" {q['peak_rss_gib']:.3f} | {r['eval_loss_equal_steps']:.4f} |"
                f" {q['eval_loss_equal_steps']:.4f} |"
                f" {r['eval_loss_equal_tokens']:.4f} |"
                f" {q.get('eval_loss_equal_tokens', float('nan')):.4f} |"
                f" {'—' if wall is None else f'{wall:.4f}'} |"
                f" {q.get('eval_loss_equal_wallclock', float('nan')):.4f} |")
        fpft = s["runs"]["fpft"]
        for config, r in s["runs"].items():
            if r["steps"] != fpft["steps"]:
                lines += ["", f"`{config}` trained {r['steps']} steps ({r['epochs']:.2f} epochs;"
                              f" {r['steps'] / r['groups']:.0f} updates of every parameter, fpft:"
                              f" {fpft['steps']}): final eval loss {r['eval_loss']:.4f},"
                              f" ×{r['ratio_to_fpft']['eval_loss']:.4f} fpft's final, in"
                              f" {r['train_seconds']:.0f} s of training"
                              f" (×{r['ratio_to_fpft']['train_seconds']:.2f} fpft's)."]
        if c["seed_noise_eval_loss"] is not None:
            spreads = "; ".join(
                f"{g}: {v:.4f} ({'within' if c['strategies_within_noise'][g] else 'outside'}"
                " noise)" for g, v in c["strategy_spread_eval_loss"].items())
            lines += ["", f"Seed-to-seed difference of final eval loss (the noise yardstick):"
                          f" {c['seed_noise_eval_loss']:.4f}. Spread of the three strategies'"
                          f" final eval loss per grouping: {spreads}."]
        lines += ["", f"![{suite}]({plots}{s['plot']})", ""]
    return "\n".join(lines)


def peers_markdown(result: dict, name: str, plots: str = "", all_seeds: bool = True) -> str:
    """The peers suites (a family of per-seed suites: their combination over seeds, then
    each seed's table, or only the first seed's unless ``all_seeds``) and the LLaMA-7B
    memory table."""
    m = result["machine"]
    lines = [f"Measured by `make bench` (`--suite peers-*`) on {m['cpu'] or 'an unnamed CPU'}"
             f" ({m['cores']} cores), torch {m['torch']}; raw numbers: `{name}.json`.", ""]
    families: dict[str, list] = {}
    for suite, s in result["suites"].items():
        if s.get("kind") == "peers":
            families.setdefault(s.get("family") or suite, []).append((suite, s))
    for family, seeded in families.items():
        if len(seeded) > 1:  # a suite per seed: their combination first
            names = list(dict.fromkeys(m for _, s in seeded for m in s["runs"]))
            lines += peers.over_seeds_markdown(
                family, peers.over_seeds([s for _, s in seeded]), names)
        for i, (suite, s) in enumerate(seeded):
            if all_seeds or i == 0:
                lines += peers.markdown(suite, s, plots)
        if len(seeded) > 1 and not all_seeds:
            lines += [f"The other seeds' tables: `{name}.md` beside the plots.", ""]
    if result.get("peers_memory_7b"):
        lines += ["### Device memory for LLaMA-7B, per method", ""]
        lines += peers.memory_markdown(result["peers_memory_7b"])
        lines += [f"![LLaMA-7B memory per method]({plots}{name}-memory-7b.png)", ""]
    return "\n".join(lines)


def write_docs(block: str, docs: Path, begin: str = BEGIN, end: str = END) -> None:
    text = docs.read_text()
    if begin not in text or end not in text:
        raise SystemExit(f"bench: {docs} lacks the {begin} ... {end} markers")
    head, rest = text.split(begin, 1)
    docs.write_text(head + begin + "\n" + block + "\n" + end + rest.split(end, 1)[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--suite", action="append",
                        choices=sorted({**SUITES, **quality.SUITES, **peers.SUITES, **QUICK,
                                        **quality.QUICK, **peers.QUICK}),
                        help="run only this suite (repeatable); default: all")
    parser.add_argument("--quick", action="store_true", help="tiny model, seconds (tests)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default=None, help="results name (default cpu-<date>)")
    parser.add_argument("--no-docs", action="store_true", help=f"leave {DOCS.name} alone")
    parser.add_argument("--only", action="append", metavar="CONFIG",
                        help="run only this method (peers) or configuration (quality)"
                             " (repeatable), beside the suite's runs in <out>/<name>.json")
    parser.add_argument("--render", metavar="NAME",
                        help="recompute the comparisons of <out>/NAME.json and rewrite its"
                             " tables (no training)")
    args = parser.parse_args(argv)
    if args.render:
        result = json.loads((args.out / f"{args.render}.json").read_text())
        for suite, s in result["suites"].items():
            if s.get("kind") == "quality":
                quality.compare(s["runs"], s["higher_is_better"])
                quality.plot(suite, s, args.out / s["plot"])
            elif s.get("kind") == "peers":
                s["comparison"] = peers.compare(s["runs"], s["higher_is_better"])
                peers.plot(suite, s, args.out / s["plot"])
            else:
                s["comparison"] = compare(s["runs"])
        if result.get("peers_memory_7b"):
            peers.plot_memory(result["peers_memory_7b"], args.out / f"{args.render}-memory-7b.png")
        write_results(result, args.out, args.render, not args.no_docs)
        return 0

    known = ({**QUICK, **quality.QUICK, **peers.QUICK} if args.quick
             else {**SUITES, **quality.SUITES, **peers.SUITES})
    default = QUICK if args.quick else known
    suites = {k: known[k] for k in (args.suite or default) if k in known}
    if not suites:
        parser.error(f"no such suite{' with --quick' if args.quick else ''}: {args.suite}")
    name = args.name or f"{'quick' if args.quick else 'cpu'}-{dt.date.today().isoformat()}"
    args.out.mkdir(parents=True, exist_ok=True)
    runs_dir = args.out / f"{name}-runs"
    start = time.perf_counter()
    result = {"date": dt.date.today().isoformat(), "machine": machine(), "suites": {}}
    previous = args.out / f"{name}.json"
    if args.suite and previous.exists():  # a rerun of some suites keeps the others
        kept = json.loads(previous.read_text())
        result["suites"] = kept["suites"]
        if "peers_memory_7b" in kept:
            result["peers_memory_7b"] = kept["peers_memory_7b"]
    memory_done = False
    for suite, spec in suites.items():
        suite_start = time.perf_counter()
        if suite in peers.SUITES or suite in peers.QUICK:
            kept = result["suites"].get(suite)
            if args.only and "fpft" not in [*args.only, *(kept or {}).get("runs", {})]:
                parser.error(f"--only: {previous} has no {suite} with fpft to compare with")
            s = peers.run_suite(spec, runs_dir / suite, ENV, start, args.only)
            s.update(date=dt.date.today().isoformat(), plot=f"{name}-{suite}.png")
            if args.only and kept:  # beside the kept runs of the same suite, as one table
                later = {**kept.get("later", {}), **{m: s["date"] for m in s["runs"]}}
                order = list(peers.methods(spec, every=True))
                runs = {**kept["runs"], **s["runs"]}
                s = {**kept, "later": later, "family": spec.get("family"),
                     "seed": spec.get("seed"),
                     "runs": {m: runs[m] for m in sorted(runs, key=order.index)}}
            if args.only:
                s.setdefault("minutes", (time.perf_counter() - suite_start) / 60)
                s["comparison"] = peers.compare(s["runs"], s["higher_is_better"])
                peers.plot(suite, s, args.out / s["plot"])
                result["suites"][suite] = s
                write_results(result, args.out, name, not args.no_docs)
                continue
            if not args.quick and not memory_done:  # LLaMA-7B per method (~1 min, once)
                result["peers_memory_7b"] = peers.memory_7b()
                memory_done = True
                peers.plot_memory(result["peers_memory_7b"], args.out / f"{name}-memory-7b.png")
            s["minutes"] = (time.perf_counter() - suite_start) / 60
            peers.plot(suite, s, args.out / s["plot"])
            result["suites"][suite] = s
            write_results(result, args.out, name, not args.no_docs)
            continue
        if "metric" in spec:  # a quality suite (a family's: one seed, joining the others)
            key = spec.get("family", suite)
            if args.only and key not in result["suites"]:
                parser.error(f"--only: {previous} has no {key} to add to")
            s = run_quality(spec, runs_dir / suite, start, args.out / f"{name}-{key}.png",
                            args.only)
            s["minutes"] = (time.perf_counter() - suite_start) / 60
            if key != suite:
                s["minutes_by_seed"] = {str(spec["seeds"][0]): s["minutes"]}
            if key in result["suites"] and (key != suite or args.only):
                s = quality.merge(result["suites"][key], s, added=bool(args.only))
                quality.plot(key, s, args.out / s["plot"])
            result["suites"][key] = s
            write_results(result, args.out, name, not args.no_docs)
            continue
        runs = {}
        for config, overrides in spec["configs"].items():
            run_dir = runs_dir / suite / config
            shutil.rmtree(run_dir, ignore_errors=True)  # a rerun must not append to old metrics
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            print(f"[{time.perf_counter() - start:6.0f} s] {suite}/{config}", flush=True)
            runs[config] = run_one(run_dir, merge(spec["base"], overrides))
            r = runs[config]
            print(f"         step {r['mean_step_seconds']:.3f} s, {r['tokens_per_second']:.0f}"
                  f" tok/s, peak RSS {r['peak_rss_gib']:.2f} GiB, eval loss {r['eval_loss']:.4f}",
                  flush=True)
        comparison = compare(runs)
        plot_path = args.out / f"{name}-{suite}.png"
        plot(suite, spec["title"], runs, plot_path)
        result["suites"][suite] = {"title": spec["title"], "base": spec["base"],
                                   "runs": runs, "comparison": comparison, "plot": plot_path.name,
                                   "date": dt.date.today().isoformat(),
                                   "minutes": (time.perf_counter() - suite_start) / 60}
        # After every suite: a long run stopped later keeps what it has measured.
        write_results(result, args.out, name, not args.no_docs)
    return 0


def run_quality(spec: dict, runs_dir: Path, start: float, plot_path: Path,
                only: list[str] | None = None) -> dict:
    """One quality suite (``only``: these configurations): the budget for k=auto, every
    configuration on every seed, means and spreads, ratios to fpft (when it ran)."""
    names = [n for n in spec["configs"] if not only or n in only]
    budget = (quality.budget_gib(spec["base"])
              if any(n.startswith("auto") for n in names) else None)
    higher, runs, fpft = spec["higher_is_better"], {}, None
    for config in names:
        by_seed = {}
        for seed in spec["seeds"]:
            run_dir = runs_dir / config / f"seed{seed}"
            shutil.rmtree(run_dir, ignore_errors=True)
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            print(f"[{time.perf_counter() - start:6.0f} s] {runs_dir.name}/{config}/seed{seed}",
                  flush=True)
            train(run_dir, merge(spec["base"], quality.overrides(config, spec, budget),
                                 [f"trainer.seed={seed}"]))
            by_seed[seed] = r = quality.seed_record(collect(
                run_dir, spec["metric"], higher, also=spec.get("also")))
            print(f"         {r['groups']} groups, {r['cycles']} cycles, best"
                  f" {r['best']['value']:.4f} at epoch {r['best']['epoch']}, final"
                  f" {r['final']['value']:.4f}, {r['train_seconds']:.0f} s", flush=True)
        if config == "fpft":  # its own time: within fpft's time is its best
            fpft = by_seed
        runs[config] = quality.aggregate(by_seed, fpft, higher)
    if "fpft" in runs:
        quality.compare(runs, higher)
    s = {"kind": "quality", "title": spec["title"], "base": spec["base"],
         "metric": spec["metric"], "higher_is_better": higher, "epochs": spec["epochs"],
         "seeds": list(spec["seeds"]), "budget_gib": budget, "runs": runs,
         "also": spec.get("also"),
         "date": dt.date.today().isoformat(), "plot": plot_path.name}
    quality.plot(spec.get("family", runs_dir.name), s, plot_path)
    return s


def write_results(result: dict, out: Path, name: str, docs: bool) -> None:
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    has_peers = any(s.get("kind") == "peers" for s in result["suites"].values())
    block = markdown(result, name)
    if has_peers:
        block += "\n\n## HiFT against the alternatives\n\n" + peers_markdown(result, name)
    (out / f"{name}.md").write_text(block + "\n")
    if docs:
        plots = os.path.relpath(out, DOCS.parent) + "/"
        write_docs(markdown(result, name, plots), DOCS)
        if has_peers:
            write_docs(peers_markdown(result, name, plots, all_seeds=False), DOCS,
                       PEERS_BEGIN, PEERS_END)
    print(block)
    print(f"\nWrote {out / name}.json, .md" + (f"; updated {DOCS}" if docs else ""))


if __name__ == "__main__":
    sys.exit(main())
