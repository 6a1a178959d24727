"""``make gpu-check``: what only a GPU can show, in one call of at most 9 minutes.

First it prints one line with the versions of the packages it runs on (recorded in the
results as ``packages``) and checks them: hift's own requirements on what the stages
import, and those of transformers, datasets, hydra-core and omegaconf (the carried
wheels are installed without their dependencies), then that each imports. A problem
ends it there, exit code 2, with one line naming the package, e.g. ``gpu-check:
datasets 3.6.0 needs pyarrow>=15.0.0, found 14.0.2``.

Stages, highest priority first, each in its own process (``--stage NAME``); the
orchestrator (no ``--stage``) rewrites ``<out>/gpu-<date>.json`` and ``.md`` after every
stage, and every few seconds while one runs with what it has measured so far (marked
``running``), so a crash, an out-of-memory kill or a timeout of a stage, or a kill of the
whole command, keeps what was measured. A failed stage is recorded with the end of its
stderr and the next one runs; a part of a stage that ran out of device memory is recorded
with ``oom: true`` (``bench/gpu_stages.py``). The exit code is 1 if any stage failed.
Nothing is needed from the Hub: models are built from their config with random weights
(``model.random_init``), fed the tiny instruction set (stages 1-3) or random token ids of
a fixed shape (4-6).

The stages and what each measures: ``bench/gpu_stages.py``, in priority order
``equality``, ``races``, ``resume`` (correctness on CUDA), then ``overlap``,
``llama7b_wide``, ``llama3_vocab``, ``llama7b_full``, ``llama3_full`` (speed and memory).

What it costs: each stage process pays ~5-10 s of imports and CUDA start. The models of
stages 4-6 are initialised on the GPU (on the host CPU a 7B fp32 init takes a minute or
more); peaks are reset after the warm-up cycle, so this changes setup time only. The
orchestrator skips a stage whose estimated cost does not fit the budget left
(``--budget``, default 540 s, counted from ``--started``: ``make gpu-check`` passes the
time it started, before installing the carried wheels; default this process's start)
and kills one that outruns its timeout or the budget.

On the lent GPU machine (python3 with torch; no PyPI; lacks hydra-core, omegaconf,
antlr4-python3-runtime, datasets, dill, multiprocess):

    make gpu-wheels                            # here: those wheels (and pyarrow, fsspec) into .whl/ (~56 MiB)
    # the device call carries .whl, runs with timeout_s=600 and writes into $OUT:
    make gpu-check GPU_PY=python3 GPU_OUT=$OUT
    # the same without make:
    start=$(date +%s)
    python3 -c "import hydra, datasets" 2>/dev/null || python3 -m pip install -q \\
        --no-index --no-deps --no-compile --upgrade --target /tmp/hift-site .whl/*.whl
    PYTHONPATH=/tmp/hift-site:$PWD HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \\
        python3 bench/gpu_check.py --out $OUT --started $start

    python bench/gpu_check.py --smoke    # every stage on CPU, tiny model (the tests)
    python bench/gpu_check.py --stages equality,races   # a subset, in priority order

Test hooks: ``GPU_CHECK_FAIL_STAGE=<name>`` makes that stage raise at its start;
``GPU_CHECK_OOM=<stage>/<run>`` makes that run's training raise ``OutOfMemoryError`` at
its first step (the performance stages name their runs as their parts: ``overlap/fpft``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Callable

_STARTED = time.time()  # before torch and hift_cli: a stage's startup cost is measured

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_stages beside this file
from gpu_stages import (  # noqa: E402
    SMOKE_COST_S,
    SMOKE_TIMEOUT_S,
    STAGES,
    _tail,
    _write_json,
    run_stage,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
POLL_S = 3  # how often a running stage's record is merged into the results


# --------------------------------------------------------------------- packages
# What the stages import (distribution: module), hift's requirements on which are
# checked; the packages whose own requirements are checked (the carried wheels are
# installed without their dependencies); and what else the version line shows.
IMPORTED = {"torch": "torch", "transformers": "transformers", "datasets": "datasets",
            "hydra-core": "hydra", "omegaconf": "omegaconf", "safetensors": "safetensors",
            "rich": "rich"}
CHECKED = ("transformers", "datasets", "hydra-core", "omegaconf")
SHOWN = (*IMPORTED, "antlr4-python3-runtime", "dill", "multiprocess", "pyarrow", "fsspec",
         "huggingface-hub", "tokenizers", "accelerate", "numpy", "packaging")


def installed(name: str) -> str | None:
    """The installed version of distribution ``name``; None if it is not installed."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def requirements(name: str) -> list[str]:
    """Distribution ``name``'s declared requirements (hift-cli: from this checkout's
    pyproject.toml, as the lent machine does not install it)."""
    if name == "hift-cli":
        import tomllib

        with open(ROOT / "pyproject.toml", "rb") as f:
            return tomllib.load(f)["project"]["dependencies"]
    return metadata.requires(name) or []


def unmet(name: str, version: str, only: set[str] | None = None) -> list[str]:
    """What ``name`` (at ``version``) requires and is not installed in a version it
    accepts; extras and requirements whose markers exclude this machine are left out,
    and with ``only``, requirements on other distributions."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import InvalidVersion

    problems = []
    for line in requirements(name):
        req = Requirement(line)
        if only is not None and canonicalize_name(req.name) not in only:
            continue
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        found = installed(req.name)
        spec = req.name + (f"[{','.join(sorted(req.extras))}]" if req.extras else "") \
            + str(req.specifier)
        try:
            if found is None:
                problems.append(f"{name} {version} needs {spec}, not installed")
            elif not req.specifier.contains(found, prereleases=True):
                problems.append(f"{name} {version} needs {spec}, found {found}")
        except InvalidVersion:  # not PEP 440: no telling; the imports will show
            pass
    return problems


def package_problem(versions: dict) -> str | None:
    """What is wrong with the packages (``versions``: as found, None if not installed),
    in one line; None if nothing is. Requirements first, then the imports."""
    missing = [name for name in IMPORTED if versions[name] is None]
    if missing:
        return f"not installed: {', '.join(missing)} (make gpu-wheels, and carry .whl)"
    problems = unmet("hift-cli", "(this checkout)", set(IMPORTED))
    for name in CHECKED:
        problems += unmet(name, versions[name])
    if not problems:
        for name, module in IMPORTED.items():
            try:
                importlib.import_module(module)
            except Exception as e:
                problems.append(f"{name} {versions[name]} does not import:"
                                f" {type(e).__name__}: {(str(e).splitlines() or [''])[0]}")
    return "; ".join(problems) or None


# --------------------------------------------------------------------- orchestrator
def machine() -> dict:
    """The host, without its name."""
    info = {"system": platform.system(), "kernel": platform.release(),
            "arch": platform.machine(), "cpus": os.cpu_count(),
            "python": platform.python_version()}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError, ValueError, IndexError):
        meminfo = Path("/proc/meminfo").read_text().splitlines()
        kib = next(int(x.split()[1]) for x in meminfo if x.startswith("MemTotal"))
        info["memory_gib"] = round(kib / 2**20, 1)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        info["gpus"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
             "--format=csv,noheader"], capture_output=True, text=True, timeout=20,
            check=True).stdout.strip().splitlines()
    return info


# A full-depth stage and the shallow one whose host buffers must have come out right.
FULL_DEPTH = {"llama7b_full": "llama7b_wide", "llama3_full": "llama3_vocab"}


def _host_buffers_wrong(stage: str, on: dict) -> str | None:
    """Why ``stage``'s offload-on run says the full depth's host buffers would not come
    out right (None: they would)."""
    if not on.get("exact_host_gib"):
        return f"{stage} measured no host bytes to go by"
    host, exact = on["host_gib"], on["exact_host_gib"]
    if abs(host / exact - 1) > 0.05:
        return (f"{stage}'s host buffers ({host:.2f} GiB) are not within 5% of the exact"
                f" figure ({exact:.2f} GiB)")
    # cudaHostRegister failed and the store fell back to the pinned caching allocator,
    # which rounds every buffer up to a power of two: 7B would want ~165 GiB pinned.
    if on.get("pinned_allocator_gib", 0) > 0.05 * exact:
        return (f"{stage}'s host buffers came from PyTorch's pinned caching allocator"
                f" ({on['pinned_allocator_gib']:.2f} GiB held for {exact:.2f} GiB): its"
                " rounding up, all layers would not fit")
    return None


def gate(name: str, results: dict, smoke: bool, left: float) -> tuple[str | None, float]:
    """Why ``name`` cannot run now (None: it can), and its estimated cost."""
    cost = SMOKE_COST_S if smoke else STAGES[name].cost_s
    if name in FULL_DEPTH:
        shallow = results["stages"].get(FULL_DEPTH[name], {})
        reason = _host_buffers_wrong(FULL_DEPTH[name],
                                     shallow.get("runs", {}).get("offload_on", {}))
        if reason:
            return reason, cost
    if name == "llama7b_full":  # its cost: projected from llama7b_wide's run
        projection = results["stages"]["llama7b_wide"].get("projection") or {}
        if "seconds" not in projection:
            return "llama7b_wide measured no projection to go by", cost
        cost = projection["seconds"] if not smoke else cost
    if cost > left:
        return f"estimated {cost:.0f} s, {left:.0f} s of the budget left", cost
    return None, cost


def stage_command(name: str, smoke: bool, work: Path, deadline: float) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--stage", name, "--out", str(work),
            "--deadline", f"{deadline:.1f}"] + (["--smoke"] if smoke else [])


def read_record(path: Path) -> dict:
    """A stage's record as it last wrote it (whole: it writes atomically); {} if none."""
    with contextlib.suppress(OSError, ValueError):
        return json.loads(path.read_text())
    return {}


def launch(name: str, smoke: bool, work: Path, deadline: float, timeout: float,
           log: Path, progress: Callable[[dict], None] | None = None) -> dict:
    """Run one stage in its own process; its result, or what is known of its failure.

    While it runs, ``progress`` gets its record (with ``seconds`` so far) whenever that
    changed, checked every ``POLL_S`` seconds.
    """
    cmd = stage_command(name, smoke, work, deadline)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if STAGES[name].deterministic:
        env["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"  # read when cuBLAS starts
    if smoke:  # the store's GPU simulation on the CPU (hift_cli/offload.py)
        env.setdefault("HIFT_STRICT_OFFLOAD", "1")
    out, err = work / f"{name}.out", work / f"{name}.err"
    path = work / f"{name}.json"
    start = time.perf_counter()
    seen: dict = {}
    with open(out, "w") as stdout, open(err, "w") as stderr:
        proc = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, env=env, cwd=work)
        while True:
            left = timeout - (time.perf_counter() - start)
            try:
                rc = proc.wait(timeout=max(0.0, min(POLL_S, left)))
                break
            except subprocess.TimeoutExpired:
                if left <= POLL_S:
                    proc.kill()
                    proc.wait()
                    rc = None
                    break
            record = read_record(path)
            if progress is not None and record and record != seen:
                seen = record
                progress({**record, "seconds": round(time.perf_counter() - start, 1)})
    entry = read_record(path)
    entry["seconds"] = round(time.perf_counter() - start, 1)
    if rc != 0:
        entry["returncode"] = rc
        entry["error"] = (f"timed out after {timeout:.0f} s" if rc is None
                          else _tail(err.read_text(errors="replace"), 15)
                          or f"exit code {rc}, nothing on stderr")
    with open(log, "a") as f:
        f.write(f"===== {name}: exit {rc} in {entry['seconds']} s\n")
        for stream in (out, err):
            text = _tail(stream.read_text(errors="replace"), 150)
            f.write(f"----- {stream.name}\n{text}\n" if text else "")
    return entry


def orchestrate(smoke: bool, out: Path, budget: float, names: list[str],
                started: float = _STARTED, packages: dict | None = None) -> int:
    """Run ``names`` in order within ``budget`` seconds of ``started`` (the command's
    start); the results go to ``<out>/gpu-<date>.json``, ``.md`` and ``.log``."""
    import hift_cli

    deadline = started + budget
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"gpu-{dt.date.today().isoformat()}"
    log = stem.with_suffix(".log")
    log.write_text("")
    results = {"date": dt.date.today().isoformat(), "smoke": smoke, "device": None,
               "torch": torch.__version__, "cuda": torch.version.cuda, "machine": machine(),
               "packages": packages, "hift_cli": hift_cli.__file__, "budget_seconds": budget,
               # before the first stage: installing the carried wheels, imports, the checks
               "setup_seconds": round(time.time() - started, 1), "stages": {}}
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    failed = []
    try:
        for i, name in enumerate(names, 1):
            left = deadline - time.time()
            reason, cost = gate(name, results, smoke, left)
            if reason is None and i > 1 and _import_failed(results):
                reason = "not run: an earlier stage could not import its modules"
            if reason is not None:
                results["stages"][name] = {"skipped": reason}
            else:
                results["stages"][name] = {"running": True, "estimated_seconds": cost}
                save(results, stem)
                timeout = min(SMOKE_TIMEOUT_S if smoke else STAGES[name].timeout_s, left)
                print(f"[{i}/{len(names)}] {name}: running (estimated {cost:.0f} s,"
                      f" timeout {timeout:.0f} s)", flush=True)

                def progress(record: dict, name=name, cost=cost) -> None:
                    # What it measured so far is in <out> even if everything is killed.
                    results["stages"][name] = {**record, "running": True,
                                               "estimated_seconds": round(cost, 1)}
                    results["seconds"] = round(time.time() - started, 1)
                    save(results, stem)

                entry = launch(name, smoke, work, deadline, timeout, log, progress)
                entry["estimated_seconds"] = round(cost, 1)
                for key, trace in entry.items():  # trace, trace_off: keep the files
                    if key.startswith("trace") and isinstance(trace, dict) \
                            and trace.get("trace_file"):
                        kept = Path(trace["trace_file"])
                        target = f"{stem.name}-{kept.name.removesuffix('.json.gz')}.json.gz"
                        shutil.copy(kept, out / target)
                        trace["trace_file"] = target
                results["stages"][name] = entry
                results["device"] = results["device"] or entry.get("device")
                if "returncode" in entry:
                    failed.append(name)
            results["seconds"] = round(time.time() - started, 1)
            save(results, stem)
            print(f"[{i}/{len(names)}] {name}: {summary(results['stages'][name])}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {stem}.json and .md in {results['seconds']:.0f} s"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def _import_failed(results: dict) -> bool:
    """A stage died before it recorded anything, on an import: the rest would too."""
    return any("returncode" in s and "startup_seconds" not in s
               and ("ImportError" in s.get("error", "") or "ModuleNotFound" in s.get("error", ""))
               for s in results["stages"].values())


def save(results: dict, stem: Path) -> None:
    """The JSON (the record) first, then its rendering."""
    _write_json(stem.with_suffix(".json"), results)
    try:
        text = render(results)
    except Exception as e:  # the JSON is written; say why the tables are not
        text = f"# gpu-check {results.get('date')}\n\n(cannot render: {e!r}; see the .json)\n"
    stem.with_suffix(".md").write_text(text)


# --------------------------------------------------------------------- report
def summary(stage: dict) -> str:
    """One line: how the stage ended and its headline figure."""
    if "skipped" in stage:
        return f"skipped ({stage['skipped']})"
    if stage.get("running"):
        return "running (or killed while running)" + (
            f" after {stage['seconds']:.0f} s" if "seconds" in stage else "")
    head = (f"FAILED (exit {stage['returncode']}): {stage['error'].splitlines()[-1]}"
            if "returncode" in stage else "ok")
    facts = [f"{stage.get('seconds', 0):.0f} s"]
    if "all_equal" in stage:
        facts.append(f"bit-equal: {stage['all_equal']}")
    if stage.get("control"):
        facts.append(f"control deterministic: {stage['control'].get('equal')}")
    if stage.get("step_time_ratio"):
        facts.append(f"offload on/off step time {stage['step_time_ratio']:.3f}")
    return f"{head} ({', '.join(facts)})"


def _num(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def _equal_cell(row: dict, kind: str) -> str:
    k = row.get("kinds", {}).get(kind)
    return "-" if k is None else "equal" if k["different"] == 0 else \
        f"**{k['different']}/{k['tensors']} differ**"


def _render_equality(stage: dict) -> list[str]:
    lines = ["| comparison | offload | pinned | weights | masters | optimizer state |",
             "|---|---|---|---|---|---|"]
    rows = {"control: off vs off": stage.get("control") or {}}
    rows.update({f"{k}: off vs on": v for k, v in stage.get("matrix", {}).items()})
    for label, row in rows.items():
        if "error" in row:
            lines.append(f"| {label} | error: {row['error'].splitlines()[-1]} | | | | |")
        else:
            lines.append(f"| {label} | {row.get('offload', 'off')} | {row.get('pinned', '-')} |"
                         f" {_equal_cell(row, 'weight')} | {_equal_cell(row, 'master')} |"
                         f" {_equal_cell(row, 'state')} |")
    if stage.get("note"):
        lines += ["", stage["note"]]
    return lines


def _render_checks(stage: dict, key: str) -> list[str]:
    lines = ["| run | bit-equal | first difference |", "|---|---|---|"]
    for label, row in stage.get(key, {}).items():
        if "error" in row:
            lines.append(f"| {label} | error: {row['error'].splitlines()[-1]} | |")
        elif "equal" in row:
            lines.append(f"| {label} | {row['equal']} | {row.get('first_difference') or '-'} |")
    return lines


def _render_perf(stage: dict) -> list[str]:
    lines = [f"{stage.get('model', '')}, batch {stage.get('batch')} x {stage.get('seq_len')}:"
             " means over the measured cycles, peaks since the last warm-up step's write-back.",
             "",
             "| run | groups | step s | stall | H2D GiB/step | peak alloc GiB |"
             " peak reserved GiB | estimated GiB | host GiB | exact host GiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in stage.get("runs", {}).items():
        if "mean_step_seconds" not in r:
            why = "OOM" if r.get("oom") else r.get("skipped") or (
                "error: " + r["error"].splitlines()[-1] if r.get("error") else "unfinished")
            lines.append(f"| {name} | {why} | | | | | | {_num(r.get('estimated_peak_gib'), '.2f')}"
                         " | | |")
            continue
        lines.append(
            f"| {name} | {r['groups']} | {_num(r['mean_step_seconds'])} |"
            f" {_num(r['stall_fraction'])} | {_num(r['h2d_gib_per_step'])} |"
            f" {_num(r.get('peak_allocated_gib'), '.2f')} |"
            f" {_num(r.get('peak_reserved_gib'), '.2f')} |"
            f" {_num(r.get('estimated_peak_gib'), '.2f')} | {_num(r['host_gib'], '.2f')} |"
            f" {_num(r['exact_host_gib'], '.2f')} |")
    if stage.get("step_time_ratio"):
        lines += ["", f"Step time with offload / without: {stage['step_time_ratio']:.3f}."]
    for key, label in (("trace", "offload on" if "trace_off" in stage else ""),
                       ("trace_off", "offload off")):
        trace = stage.get(key) or {}
        if not trace.get("steps"):
            continue
        h2d = trace.get("h2d") or {}
        lines += ["", f"Profiler{' (' + label + ')' if label else ''}, {trace['steps']} steps,"
                  f" `{trace.get('trace_file', '-')}`:"]
        if trace.get("span_ms"):
            lines[-1] += (f" the compute stream was busy {_num(trace['compute_busy_fraction'])}"
                          f" of the {trace['span_ms']:.1f} ms from the first GPU event to"
                          " the last.")
        if h2d.get("copies"):
            lines[-1] += (f" {h2d['copies']} host-to-device copies, {h2d['copy_us'] / 1e3:.1f}"
                          f" ms, of which {_num(h2d['overlap_fraction'])} overlapped compute"
                          " kernels.")
        duplex = trace.get("d2h_during_h2d") or {}
        if duplex.get("copies"):
            lines[-1] += (f" {duplex['copies']} device-to-host copies,"
                          f" {duplex['copy_us'] / 1e3:.1f} ms, of which"
                          f" {_num(duplex['overlap_fraction'])} ran beside host-to-device"
                          " copies (the two copy streams).")
    on = stage.get("runs", {}).get("offload_on", {})
    if "measured_reserve_gib" in on:
        lines += ["", f"Peak allocated / estimated: {1 + on['estimate_error']:.3f}. Measured"
                  f" reserve: CUDA context {_num(stage.get('cuda_context_gib'), '.2f')} GiB +"
                  f" reserved-but-free at the peak = {on['measured_reserve_gib']:.2f} GiB."]
    if "need_over_estimate_gib" in on:
        lines[-1] += (f" Context + peak reserved - estimated = {on['need_over_estimate_gib']:.2f}"
                      " GiB, what hift.memory_reserve must cover (its default on a 24 GiB"
                      f" card: {on['default_reserve_gib']:g} GiB).")
    p = stage.get("projection") or {}
    if "seconds" in p:
        lines += ["", f"Projected for all layers: {p['params'] / 1e9:.2f}B parameters,"
                  f" {p['host_gib']:.1f} GiB of host buffers, ~{p['seconds']:.0f} s."]
    return lines


RENDERERS = {"equality": _render_equality,
             "races": lambda s: _render_checks(s, "runs"),
             "resume": lambda s: _render_checks(s, "checks"),
             "overlap": _render_perf, "llama7b_wide": _render_perf,
             "llama3_vocab": _render_perf, "llama7b_full": _render_perf,
             "llama3_full": _render_perf}


def render(results: dict) -> str:
    m = results["machine"]
    lines = [f"# gpu-check {results['date']} on {results.get('device') or '?'}"
             + (" (smoke run on the CPU)" if results["smoke"] else ""), "",
             f"torch {results['torch']}, CUDA {results['cuda']}; {m.get('cpus')} x"
             f" {m.get('cpu', m.get('arch'))}, {m.get('memory_gib', '?')} GiB,"
             f" {m['system']} {m['kernel']}, Python {m['python']}."
             + (f" GPU: {'; '.join(m['gpus'])}." if m.get("gpus") else "")
             + f" {results.get('seconds', 0):.0f} s of a {results['budget_seconds']:.0f} s"
             " budget (from the command's start)."]
    if results.get("packages"):
        lines += ["", "Packages: " + versions_line(results["packages"]) + "."]
    for name, stage in results["stages"].items():
        lines += ["", f"## {name}", "", summary(stage)]
        # A running stage has tables once it recorded its start (every stage does first).
        if "skipped" in stage or (stage.get("running") and "startup_seconds" not in stage):
            continue
        try:
            lines += ["", *RENDERERS[name](stage)]
        except Exception as e:  # a partial result must not cost the report
            lines += ["", f"(cannot render: {e!r})"]
    return "\n".join(lines) + "\n"


def versions_line(versions: dict) -> str:
    return ", ".join(f"{name} {version or 'not installed'}" for name, version in versions.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="every stage on the CPU with the tiny model and tiny shapes")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default: bench/results; --smoke: a temp dir)")
    parser.add_argument("--budget", type=float, default=540,
                        help="seconds for the whole check from --started (default 540)")
    parser.add_argument("--started", type=float, default=_STARTED,
                        help="when the command started, seconds since the epoch (make"
                        " gpu-check: before installing the carried wheels; default now)")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help="comma-separated subset to run (priority order is kept)")
    parser.add_argument("--stage", choices=list(STAGES), help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if args.stage:
        if args.out is None:
            parser.error("--stage needs --out (the folder its result goes to)")
        deadline = args.deadline or time.time() + args.budget
        return run_stage(args.stage, args.smoke, args.out, deadline, _STARTED)
    unknown = set(args.stages.split(",")) - set(STAGES)
    if unknown:
        parser.error(f"unknown stage(s) {', '.join(sorted(unknown))}; stages: {', '.join(STAGES)}")
    names = [n for n in STAGES if n in args.stages.split(",")]
    versions = {name: installed(name) for name in SHOWN}
    print(f"gpu-check: Python {platform.python_version()}; {versions_line(versions)}",
          flush=True)
    if not args.smoke and not torch.cuda.is_available():
        print("gpu-check needs CUDA: no GPU on this machine, nothing was measured.")
        return 0
    problem = package_problem(versions)
    if problem is not None:
        print(f"gpu-check: {problem}", flush=True)
        return 2
    out = args.out or (Path(tempfile.mkdtemp(prefix="gpu-check-smoke-")) if args.smoke
                       else RESULTS)
    return orchestrate(args.smoke, out, args.budget, names, args.started, versions)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # a plain checkout: hift_cli from here
    sys.exit(main())
