"""The 7-8B models on one 24 GB card: ``hift memprofile`` estimates, side by side.

For each model's shape preset and each (precision, optimizer, batch, budget) setting,
runs ``hift memprofile ... hift.k=auto memprofile.format=json`` (no GPU, no weights) and
collects what k=auto chose: groups, the peak and its group, the headroom under the budget
less its reserve, the largest batch at that grouping, and full fine-tuning's peak. Writes
``bench/results/plan-<date>.json`` and ``.png`` (each setting's peak group, stacked by
category, against the usable budget) and the table between the ``plan`` markers of
``docs/memory.md``.

    python bench/plan.py                 # every row (~5 min on 2 CPU cores)
    python bench/plan.py --no-docs       # leave docs/memory.md alone
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DOCS = ROOT / "docs" / "memory.md"
BEGIN, END = "<!-- plan:begin -->", "<!-- plan:end -->"
GIB = 2**30
CATEGORIES = ("weights", "gradients", "optimizer_states", "fp32_masters", "activations",
              "other")
MODELS = {"llama-7b": "LLaMA-2-7B", "llama-3-8b": "Llama-3-8B", "qwen2.5-7b": "Qwen2.5-7B",
          "mistral-7b": "Mistral-7B-v0.3"}
MIXED = ("bf16-mixed", "adamw")  # fp32 AdamW state and fp32 masters for every parameter
EIGHT_BIT = ("bf16", "adamw8bit")  # pure bf16 weights, bitsandbytes 8-bit AdamW state
# (model, (precision, optimizer), batch, length, budget GiB)
ROWS = [*((m, MIXED, 8, 512, 24) for m in MODELS),
        *((m, EIGHT_BIT, 8, 512, 24) for m in MODELS),
        # recipe=llama3_8b_alpaca: batch 4 (x 2 accumulated), as 8 does not fit.
        ("llama-3-8b", MIXED, 4, 512, 24),
        # torchtune's single-device Llama-3.1-8B full fine-tune: 18.9 GiB at 2 x 2048.
        ("llama-3-8b", EIGHT_BIT, 2, 2048, 20),
        ("llama-7b", EIGHT_BIT, 8, 512, 18)]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1"}


def estimate(model: str, setting: tuple[str, str], batch: int, length: int,
             budget: float) -> dict:
    precision, optimizer = setting
    args = ["memprofile", "recipe=llama7b_alpaca", f"memprofile.shape={model}",
            f"trainer.precision={precision}", f"optimizer={optimizer}",
            f"trainer.batch_size={batch}", f"data.max_length={length}", "hift.k=auto",
            f"hift.memory_budget={budget}", "memprofile.format=json"]
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", "import sys; from hift_cli.cli import main; sys.exit(main())",
         *args], capture_output=True, text=True, env=ENV, cwd=ROOT)
    seconds = time.perf_counter() - start
    row = {"model": model, "name": MODELS[model], "precision": precision,
           "optimizer": optimizer, "batch": batch, "seq_len": length, "budget_gib": budget,
           "command": "hift " + " ".join(args), "seconds": round(seconds, 1)}
    if out.returncode != 0:
        return {**row, "error": out.stderr.strip().splitlines()[-1]}
    text = out.stdout
    report = json.loads(text[text.index("{") if text.startswith("{") else text.index("\n{") + 1:])
    b = report["budget"]
    peak = next(g for g in report["per_group"] if g["group"] == report["hift_peak_group"])
    return {**row, "params": report["params"], "units": report["units"],
            "groups": report["groups"], "reserve_gib": b["reserve_gib"],
            "peak_gib": b["peak"] / GIB, "headroom_gib": b["headroom"] / GIB,
            "fits": b["fits"], "largest_batch": b.get("largest_batch_size"),
            "peak_group": report["hift_peak_group"], "fpft_gib": report["fpft"]["total"] / GIB,
            "peak_rows_gib": {c: peak[c] / GIB for c in CATEGORIES}}


def markdown(result: dict) -> str:
    lines = ["| model | precision, optimizer | batch | budget (reserve) | groups (units) |"
             " peak GiB | peak group | headroom GiB | largest batch | fpft GiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        what = f"{r['precision']}, {r['optimizer']}"
        shape = f"{r['batch']} x {r['seq_len']}"
        if "error" in r:
            fit = re.search(r"one unit per group \(k=(\d+)\), is ([\d.]+) GiB", r["error"])
            lines.append(f"| {r['name']} | {what} | {shape} | {r['budget_gib']:g} | — |"
                         + (f" {fit[2]} at k={fit[1]} | does not fit | | | |" if fit
                            else f" — | {r['error']} | | | |"))
            continue
        lines.append(
            f"| {r['name']} | {what} | {shape} | {r['budget_gib']:g} ({r['reserve_gib']:g}) |"
            f" {r['groups']} ({r['units']}) | **{r['peak_gib']:.2f}** | {r['peak_group']} |"
            f" {r['headroom_gib']:.2f} | {r['largest_batch']} | {r['fpft_gib']:.1f} |")
    return "\n".join(lines + ["", f"![peak group per setting]({result['plot']})"])


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "error" not in r]
    fig, ax = plt.subplots(figsize=(11, 5))
    labels = [f"{r['name']}\n{r['precision']}, {r['optimizer']}\n{r['batch']}x{r['seq_len']}"
              for r in rows]
    bottom = [0.0] * len(rows)
    for c in CATEGORIES:
        values = [r["peak_rows_gib"][c] for r in rows]
        ax.bar(range(len(rows)), values, bottom=bottom, label=c.replace("_", " "))
        bottom = [b + v for b, v in zip(bottom, values)]
    for i, r in enumerate(rows):
        usable = r["budget_gib"] - r["reserve_gib"]
        ax.hlines(usable, i - 0.4, i + 0.4, colors="black", linestyles="dashed")
        ax.text(i, r["peak_gib"] + 0.3, f"{r['peak_gib']:.1f}\nk={r['groups']}",
                ha="center", fontsize=7)
    ax.set_xticks(range(len(rows)), labels, fontsize=6)
    ax.set_ylabel("GiB, the peak group (dashed: budget less reserve)")
    ax.set_title(f"HiFT on one 24 GB card, k=auto (estimated {result['date']})")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_docs(block: str) -> None:
    text = DOCS.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    DOCS.write_text(text[:start] + "\n" + block + "\n" + text[end:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args(argv)
    date = dt.date.today().isoformat()
    name = f"plan-{date}"
    result = {"date": date, "plot": f"{name}.png", "rows": []}
    for model, setting, batch, length, budget in ROWS:
        row = estimate(model, setting, batch, length, budget)
        result["rows"].append(row)
        print(f"{row['name']} {row['precision']} {row['optimizer']} {batch}x{length} in"
              f" {budget} GiB: " + (row["error"] if "error" in row else
                                    f"{row['groups']} groups, peak {row['peak_gib']:.2f} GiB,"
                                    f" headroom {row['headroom_gib']:.2f}") + f" ({row['seconds']} s)",
              flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=1))
    plot(result, args.out / f"{name}.png")
    block = markdown(result)
    print(block)
    if not args.no_docs:
        rel = os.path.relpath(args.out, DOCS.parent)
        write_docs(block.replace(f"]({result['plot']})", f"]({rel}/{result['plot']})"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
