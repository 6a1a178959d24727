"""The ``quality`` suites of ``make bench``: quality per epoch, judged as the HiFT paper's
scripts judge it.

Every configuration trains the same number of epochs (``trainer.epochs``) on the same data
in the same order and is evaluated after every epoch (``trainer.eval_every=epoch``); a
configuration's result is its best epoch (the metric, the epoch it came at and the training
time it took to get there) and its final epoch. Configurations:

- ``fpft``: full fine-tuning, the yardstick every ratio is taken to;
- ``auto``: ``hift.k=auto`` under a memory budget that full fine-tuning does not fit
  (halfway between the estimated peak of the smallest grouping and fpft's, both from
  ``hift memprofile`` on the suite's own settings);
- ``k4`` and ``m1`` (one unit per group);
- each HiFT one again with ``hift.always_active=[head]``;
- ``k4-x4``: ``k4`` given 4 times the epochs (each parameter then gets as many updates as
  under fpft), where the suite lists it.

``quality-subunits`` puts ``auto`` with units cut into sub-units (the default) beside
``auto`` with whole units (``hift.max_unit_params=null``), on two seeds.

Used by ``bench/compare.py`` (``--suite quality-minilm``, ``--suite quality-smollm2``,
``--suite quality-subunits``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HEAD = ["hift.always_active=[head]"]

SUITES = {
    "quality-minilm": {
        "title": "all-MiniLM-L6-v2, kinship-relation classification (12 labels), per epoch",
        "metric": "eval/accuracy", "higher_is_better": True, "epochs": 3,
        # 1,600 questions / batch 16 = 100 steps per epoch.
        "base": ["recipe=minilm_family", "data.num_train=1600", "trainer.batch_size=16",
                 "trainer.max_steps=null", "trainer.epochs=3", "trainer.eval_every=epoch",
                 "trainer.lr_scheduler=linear", "trainer.warmup_cycles=0",
                 "optimizer.lr=1e-4", "trainer.log_every=50"],
        "x4": True,
    },
    "quality-smollm2": {
        "title": "SmolLM2-135M-Instruct, GSM-style math (answer tokens), per epoch",
        "metric": "eval/loss", "higher_is_better": False, "epochs": 2,
        # 128 problems / batch 4 = 32 steps per epoch: m=1's 32 groups each train once.
        "base": ["recipe=demo", "data.num_train=128", "data.num_eval=32",
                 "data.max_eval_samples=32", "trainer.batch_size=4", "trainer.max_steps=null",
                 "trainer.epochs=2", "trainer.eval_every=epoch", "trainer.eval_batch_size=16",
                 "trainer.lr_scheduler=linear", "optimizer.lr=1e-4", "eval.show_samples=0"],
        "x4": False,  # 4x the epochs of SmolLM2 does not fit the suite's 30 minutes here
    },
}
# Sub-units (hift.max_unit_params): SmolLM2's tied embeddings are 8 blocks. k=auto under
# one budget with them cut into sub-units (the default) and whole, two seeds each, with
# offload on (the GPU's memory model, run on the CPU). The budget is the tightest whole
# units fit at all (their smallest peak, one unit per group, plus 2%): the case sub-units
# are for. A budget that leaves every sub-unit of the embeddings in one group trains
# exactly as whole units do (tests/test_subunits.py), so it would show nothing.
SUITES["quality-subunits"] = {
    **SUITES["quality-smollm2"],
    "base": [*SUITES["quality-smollm2"]["base"], "hift.offload=true"],
    "title": "SmolLM2-135M-Instruct, GSM-style math: k=auto with and without sub-units under"
             " the tightest budget whole units fit, per epoch",
    "units": True, "seeds": (42, 7), "budget": "whole-smallest",
}
QUICK = {  # the same code path on the random-init tiny LLaMA: seconds (tests)
    "quality-tiny": {
        "title": "tiny random-init LLaMA (smoke test of the quality suite itself)",
        "metric": "eval/loss", "higher_is_better": False, "epochs": 2,
        "base": ["recipe=tiny", "data.max_samples=48", "trainer.batch_size=8",
                 "trainer.max_steps=null", "trainer.epochs=2", "trainer.eval_every=epoch",
                 "eval.show_samples=0"],
        "x4": True, "only": ("fpft", "auto", "k4+head", "k4-x4"),
    },
}


def budget_gib(base: list[str], env: dict, cwd: Path, rule: str = "halfway") -> float:
    """Halfway between the smallest grouping's estimated peak (one unit per group) and
    full fine-tuning's, for the suite's own settings, on the device the runs will use (the
    offload rule differs: on with CUDA, off on a CPU); ``whole-smallest``: the smallest
    peak with whole units, plus 2%."""
    import torch

    device = [] if torch.cuda.is_available() else ["trainer.device=cpu"]

    def peak(*overrides: str) -> tuple[float, float]:
        out = subprocess.run(
            [sys.executable, "-c", "import sys; from hift_cli.cli import main; sys.exit(main())",
             "memprofile", *base, *device, *overrides, "memprofile.format=json"],
            capture_output=True, text=True, env=env, cwd=cwd, check=True).stdout
        report = json.loads(out[out.index("{"):])
        return report["fpft"]["total"], report["hift"]["total"]

    if rule == "whole-smallest":  # the tightest budget whole units fit (+2%)
        _, whole = peak("hift.k=null", "hift.m=1", "hift.max_unit_params=null")
        return round(whole * 1.02 / 2**30, 4)
    fpft, smallest = peak("hift.k=null", "hift.m=1")
    return round((fpft + smallest) / 2 / 2**30, 4)


def configs(spec: dict, budget: float) -> dict[str, list[str]]:
    out = {"fpft": ["hift.strategy=fpft"]}
    if spec.get("units"):  # k=auto, units cut into sub-units or whole, per seed
        auto = ["hift.strategy=bottom2up", "hift.k=auto", f"hift.memory_budget={budget}"]
        for seed in spec["seeds"]:
            out[f"auto-seed{seed}"] = [*auto, f"trainer.seed={seed}"]
            out[f"auto-whole-seed{seed}"] = [*auto, "hift.max_unit_params=null",
                                             f"trainer.seed={seed}"]
        return out
    for name, shape in (("auto", ["hift.k=auto", f"hift.memory_budget={budget}"]),
                        ("k4", ["hift.k=4"]), ("m1", ["hift.m=1"])):
        out[name] = ["hift.strategy=bottom2up", *shape]
        out[f"{name}+head"] = ["hift.strategy=bottom2up", *shape, *HEAD]
    if spec["x4"]:
        out["k4-x4"] = ["hift.strategy=bottom2up", "hift.k=4",
                        f"trainer.epochs={4 * spec['epochs']}"]
    return {k: v for k, v in out.items() if k in spec.get("only", out)}


def collect(run_dir: Path, metric: str, higher_is_better: bool) -> dict:
    """Every epoch's metric with the training seconds spent until then; best and final."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    seconds, at_step = 0.0, {0: 0.0}
    for r in rows:
        if "step_seconds" in r:
            seconds += r["step_seconds"]
            at_step[r["step"]] = seconds
    epochs = [{"step": r["step"], "epoch": r.get("epoch"), "value": r[metric],
               "seconds": at_step.get(r["step"], seconds)}
              for r in rows if metric in r and r["step"] > 0]
    pick = max if higher_is_better else min
    best = pick(epochs, key=lambda e: e["value"])
    return {"groups": summary["groups"], "steps": max(at_step), "train_seconds": seconds,
            "epochs": epochs, "best": best, "final": epochs[-1],
            "before": next((r[metric] for r in rows if metric in r and r["step"] == 0), None)}


def compare(runs: dict[str, dict]) -> None:
    """Ratios to fpft's from the same invocation, written into each run."""
    base = runs["fpft"]
    for r in runs.values():
        r["ratio_to_fpft"] = {
            "best": r["best"]["value"] / base["best"]["value"],
            "final": r["final"]["value"] / base["final"]["value"],
            "seconds_to_best": r["best"]["seconds"] / base["best"]["seconds"],
            "train_seconds": r["train_seconds"] / base["train_seconds"],
        }


def markdown(suite: str, s: dict) -> list[str]:
    metric = s["metric"].removeprefix("eval/")
    better = "higher" if s["higher_is_better"] else "lower"
    lines = [f"### {suite}: {s['title']}", "",
             f"Measured {s['date']}, {s['minutes']:.0f} min for the suite. `{' '.join(s['base'])}`;"
             f" {s['epochs']} epochs for every configuration (k4-x4: 4x), eval after every epoch;"
             f" {metric}, {better} is better. `auto`: `hift.k=auto"
             f" hift.memory_budget={s['budget_gib']}` (GiB, "
             + ("the smallest peak of whole units, one per group, plus 2%"
                if s.get("budget_rule") == "whole-smallest" else
                "halfway between the smallest grouping's estimated peak and fpft's, which does"
                " not fit it") + "). Ratios are to fpft in the same invocation.", "",
             f"| config | groups | steps | best {metric} | ×fpft | at epoch | train s to best"
             f" | ×fpft | final {metric} | ×fpft | train s | ×fpft |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in s["runs"].items():
        q, b = r["ratio_to_fpft"], r["best"]
        epoch = "—" if b["epoch"] is None else f"{b['epoch']:.0f}"
        lines.append(
            f"| {name} | {r['groups']} | {r['steps']} | {b['value']:.4f} | {q['best']:.3f} |"
            f" {epoch} | {b['seconds']:.0f} | {q['seconds_to_best']:.2f} |"
            f" {r['final']['value']:.4f} | {q['final']:.3f} | {r['train_seconds']:.0f} |"
            f" {q['train_seconds']:.2f} |")
    return lines + [""]
