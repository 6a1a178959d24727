"""The ``hift`` command: one dispatcher over five Hydra apps.

    hift train [overrides]        fine-tune (recipe=demo by default)
    hift eval [overrides]         loss / perplexity of a model or checkpoint
    hift generate [overrides]     answer prompts with a model or checkpoint
    hift export [overrides]       a model folder with its model card, pushed to the Hub
    hift memprofile [overrides]   parameters and bytes per group

Nothing heavy is imported here: torch and transformers load inside the task functions,
so ``hift --help`` and bad-config errors return at once.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from typing import Callable

import hydra
from omegaconf import DictConfig, OmegaConf

from hift_cli import __version__
from hift_cli.config import Config, ConfigError, recipes_dir, to_config
from hift_cli.errors import HiftError, TrainingStopped

log = logging.getLogger(__name__)
CONFIG_PATH = "pkg://hift_cli.recipes"
USAGE = f"""\
hift {__version__}: hierarchical full-parameter fine-tuning (HiFT) of language models

usage: hift <command> [key=value ...] [recipe=<name>] [-m] [--cfg job] [--help]

commands:
  train        fine-tune a model; writes metrics.jsonl, config.yaml and model/ to the run dir
  eval         loss and perplexity of a model or checkpoint (checkpoint=<dir>) on a data split
  generate     answer prompt=<text>, or each line typed, with a model or checkpoint
  export       the model folder with a model card (README.md); pushed to export.repo_id
  memprofile   parameter counts and bytes per HiFT group

examples:
  hift train                                    # offline demo: SmolLM2-135M on GSM-style math
  hift train recipe=tiny hift.strategy=top2down hift.k=3 trainer.max_steps=12
  hift train -m recipe=tiny hift.k=2,4 trainer.max_steps=4
  hift eval recipe=tiny checkpoint=outputs/train/<run>/model
  hift generate checkpoint=outputs/train/<run> prompt="What is 12 times 7?"
  hift export checkpoint=outputs/train/<run> export.repo_id=<user>/<name>
  hift memprofile recipe=demo hift.k=4
  hift train --cfg job                          # print the composed config and exit
  hift train --help                             # config groups and every key

recipes: {{recipes}}
"""


def usage() -> str:
    """USAGE with the packaged recipes listed (read from the folder, so never stale)."""
    names = sorted(p.stem for p in (recipes_dir() / "recipe").glob("*.yaml"))
    listed = ", ".join(f"{n} (default)" if n == "demo" else n for n in names)
    return USAGE.replace("{recipes}", f"{listed}; see `hift train recipe=<name> --cfg job`")


def say(line: str) -> None:
    """One line on stderr; under torchrun only rank 0 speaks (N copies help no one)."""
    if os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr)


def _output_dir() -> str:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.output_dir


def _validated(cfg: DictConfig, estimate_only: bool = False) -> Config:
    """The typed config; keys given on the command line win over the recipe's."""
    from hydra.core.hydra_config import HydraConfig

    return to_config(cfg, HydraConfig.get().overrides.task, estimate_only)


def _as_trained(cfg: DictConfig) -> DictConfig:
    """``hift eval checkpoint=<a run's model or checkpoint>``: the run's own config (its
    model and data settings), with this command line's ``key=value`` on top. A config
    group on the command line (``recipe=``, ``data=``...) means the recipe's: as given."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from hift_cli.runs import trained_model

    if not cfg.get("checkpoint"):
        return cfg
    overrides = OverridesParser.create().parse_overrides(list(HydraConfig.get().overrides.task))
    groups = {o.key_or_group for o in overrides if "." not in o.key_or_group} - {
        "checkpoint", "resume"}
    run = trained_model(cfg.checkpoint)
    if groups or run.config is None:
        return cfg
    saved = OmegaConf.merge(OmegaConf.structured(Config), run.config)  # the schema's types
    for o in overrides:
        if "." in o.key_or_group or o.key_or_group == "checkpoint":
            OmegaConf.update(saved, o.key_or_group, o.value())
    saved.resume = None
    log.info(f"hift eval: the settings of the run {run.run} (its config.yaml), with this"
             " command line's on top")
    return saved


def _remove_if_empty(run_dir: str) -> None:
    """A run stopped by bad input leaves no folder behind (only if it holds nothing but
    Hydra's records, the log, the config and its plan)."""
    import shutil
    from pathlib import Path

    root = Path(run_dir).absolute()
    files = [p for p in root.rglob("*") if p.is_file()]
    if all(p.name.endswith(".log") or p.name in ("config.yaml", "plan.yaml")
           or ".hydra" in p.parts for p in files):
        shutil.rmtree(root, ignore_errors=True)
        # And the folders Hydra made above it (outputs/<command>/), if nothing else is there.
        here = Path.cwd()
        for parent in root.parents:
            if parent == here or here not in parent.parents:
                break
            try:
                parent.rmdir()  # only if empty
            except OSError:
                break


def _user_errors(task: Callable[[DictConfig], object]) -> Callable[[DictConfig], object]:
    """hift's errors raised inside a task become one line on stderr and their exit code
    (bad input: 2; a write that failed: 74; a stop: 1 or 128 + the signal).

    Raised as SystemExit so Hydra's job runner (which catches Exception and adds its own
    lines) lets it through untouched: the one place an error becomes an exit.
    """

    @functools.wraps(task)
    def wrapper(cfg: DictConfig):
        command = sys.argv[0].replace("-", " ")
        try:
            return task(cfg)
        except TrainingStopped as e:  # a deliberate stop with its own message
            say(f"{command}: {e.message}")
            raise SystemExit(e.exit_code) from None
        except HiftError as e:
            say(f"{command}: error: {e}")
            if os.environ.get("RANK", "0") == "0":
                _remove_if_empty(_output_dir())
            raise SystemExit(e.exit_code) from None

    return wrapper


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="config")
@_user_errors
def train_app(cfg: DictConfig) -> float | None:
    config = _validated(cfg)  # before any work
    from hift_cli.run import run_training

    metrics = run_training(config, _output_dir())
    return metrics.get("eval/loss")  # what a sweeper would minimise


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="config")
@_user_errors
def eval_app(cfg: DictConfig) -> float | None:
    config = _validated(_as_trained(cfg))
    from hift_cli.evaluate import run_eval

    return run_eval(config, _output_dir()).get("eval/loss")


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="config")
@_user_errors
def memprofile_app(cfg: DictConfig) -> None:
    # An estimate plans a GPU run from any machine: CUDA-only optimizers need no GPU.
    config = _validated(cfg, estimate_only=not cfg.memprofile.measure)
    from hift_cli.memprofile import run_memprofile

    run_memprofile(config, _output_dir())


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="config")
@_user_errors
def generate_app(cfg: DictConfig) -> None:
    config = _validated(cfg)
    from hift_cli.generate import run_generate

    try:
        run_generate(config)
    finally:
        _remove_if_empty(_output_dir())  # a conversation leaves no run folder


def generate() -> None:
    """``hift generate``: ``prompt=`` is taken as typed (to Hydra, commas would make a
    sweep, and quotes and ``${`` syntax), and logs go to stderr: stdout is the answers."""
    import re

    args = []
    for arg in sys.argv[1:]:
        if arg.startswith("prompt="):
            # A Hydra quoted string: backslashes before a quote, ${ or the end doubled.
            text = re.sub(r"(\\+)(?='|\$\{|$)", r"\1\1", arg[len("prompt="):])
            arg = "prompt='" + text.replace("'", "\\'").replace("${", "\\${") + "'"
        args.append(arg)
    sys.argv[1:] = _with_overrides(
        args, ["hydra.job_logging.handlers.console.stream=ext://sys.stderr"])
    generate_app()


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="config")
@_user_errors
def export_app(cfg: DictConfig) -> None:
    config = _validated(cfg)
    from hift_cli.export import run_export

    run_export(config, _output_dir())


APPS: dict[str, Callable[[], None]] = {
    "train": train_app, "eval": eval_app, "generate": generate, "export": export_app,
    "memprofile": memprofile_app,
}


def one_line(e: BaseException) -> str:
    """Hydra/OmegaConf errors span several lines; users get the gist on one."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    text = lines[0] if lines else type(e).__name__
    options, collecting = [], False
    for ln in lines[1:]:
        if ln.startswith("Available options"):
            collecting = True
        elif ln.endswith(":"):
            collecting = False
        elif collecting:
            options.append(ln)
    if options:
        text += f" (available: {', '.join(options)})"
    cause = e.__cause__ or e.__context__
    if cause is not None and not isinstance(cause, HiftError) and str(cause).strip():
        cause_line = str(cause).strip().splitlines()[0]
        if cause_line not in text:
            text += f" {cause_line}"
    return text


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hift`` console script; returns the exit code."""
    code = _main(list(sys.argv[1:] if argv is None else argv))
    if code and os.environ.get("RANK", "0") != "0":
        # torchrun stops every rank once one fails: give rank 0 a moment to say why.
        import time

        time.sleep(3)
    return code


def _main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage(), end="")
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"hift {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in APPS:
        say(f"hift: error: unknown command {command!r} (choose from {', '.join(APPS)})")
        return 2
    # Let exceptions reach us instead of Hydra's multi-line report with a stack.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    if command == "train":
        # Growable segments instead of fixed blocks: little fragmentation on a GPU, which
        # hift.memory_reserve's default counts on (before CUDA starts; yours wins if set).
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    overrides = [f"hydra.job.name={command}"]
    data_parallel = int(os.environ.get("WORLD_SIZE", "1")) > 1  # started by torchrun
    if data_parallel:
        if command != "train" or "-m" in rest or "--multirun" in rest:
            what = "a -m sweep" if command == "train" else f"hift {command}"
            say(f"hift {command}: error: {what} runs in one process: start it without"
                " torchrun (data parallel is for one `hift train` run)")
            return 2
        overrides += _distributed_overrides(rest)
    saved_argv = sys.argv
    sys.argv = [f"hift-{command}", *_with_overrides(rest, overrides)]
    try:
        APPS[command]()
        if data_parallel:
            # Every rank done (rank 0 writes the reports last): leave the process group
            # together; a rank tearing gloo down while another still talks to it aborts.
            from hift_cli import distributed

            distributed.barrier()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except KeyboardInterrupt:
        say(f"hift {command}: interrupted")
        return 130
    except Exception as e:
        if isinstance(e, TrainingStopped):
            say(f"hift {command}: {e.message}")
            return e.exit_code
        if _is_user_error(e):
            say(f"hift {command}: error: {one_line(e)}")
            return getattr(e, "exit_code", 2)
        if isinstance(e, OSError) and e.filename and _in_hydra(e):
            # Hydra creates the run folder (hydra.run.dir / hydra.sweep.dir) before our code.
            say(f"hift {command}: error: cannot create the output folder {e.filename}:"
                f" {e.strerror or e} (give a folder you can write: hydra.run.dir, or"
                " hydra.sweep.dir with -m)")
            return 2
        raise
    finally:
        sys.argv = saved_argv
        if data_parallel:
            from hift_cli import distributed

            distributed.shutdown()
    return 0


def _with_overrides(args: list[str], overrides: list[str]) -> list[str]:
    """Add our overrides, e.g. ``hydra.job.name=<command>`` (it names the output folder,
    outputs/<command>/).

    Hydra's argparse wants all overrides in one run of positionals, so the new ones go
    just before the user's first override, or last if there is none.
    """
    for i, arg in enumerate(args):
        if "=" in arg and not arg.startswith("-"):
            return [*args[:i], *overrides, *args[i:]]
    return [*args, *overrides]


def _distributed_overrides(args: list[str]) -> list[str]:
    """Under torchrun: one run dir for the whole job, and only rank 0 writes to it."""
    import datetime as dt

    from hift_cli import distributed

    this = distributed.init()
    overrides = []
    if not any(a.startswith("hydra.run.dir=") for a in args):
        # Each process would name the dir after its own clock: use rank 0's.
        stamp = distributed.broadcast_object(dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))
        overrides.append(f"hydra.run.dir=outputs/train/{stamp}")
    if not this.main:  # no .hydra/ records, no log file; errors only on the console
        overrides += ["hydra.output_subdir=null", "hydra.job_logging.root.handlers=[]",
                      "hydra.job_logging.root.level=ERROR"]
    return overrides


def _is_user_error(e: BaseException) -> bool:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(e, (HiftError, HydraException, OmegaConfBaseException)):
        return True
    # Hydra rejects bad command lines (e.g. -m with --cfg) with a plain ValueError.
    return isinstance(e, ValueError) and _in_hydra(e)


def _in_hydra(e: BaseException) -> bool:
    """Raised by Hydra's own code (the innermost frame outside the standard library)."""
    import sysconfig

    stdlib = sysconfig.get_paths()["stdlib"]
    frames, tb = [], e.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_filename)
        tb = tb.tb_next
    ours = [f for f in frames if not f.startswith(stdlib)]
    return bool(ours) and "/hydra/" in ours[-1]


if __name__ == "__main__":
    sys.exit(main())
