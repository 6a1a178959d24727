"""The package's shape: its import graph points one way (no module imports one that
imports it back, and no function-local import hides such a circle; cli.py alone imports
its commands lazily, so that `hift --help` starts fast), checkpoint I/O knows nothing of
the trainer, and the state store is used through its protocol."""

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "hift_cli"
LAZY_OK = {"cli"}


def _name(path: Path) -> str:
    """A module's name in the package: ``engine``, ``memory`` (a package's __init__),
    ``memory.counting``."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(hift_cli module imported, whether the import is inside a function)."""
    tree = ast.parse(path.read_text())
    local = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef,
             ast.AsyncFunctionDef)) for n in ast.walk(f)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and \
                node.module.split(".")[0] == "hift_cli":
            base = node.module.split(".", 1)[1] if "." in node.module else ""
            # from hift_cli.memory import activations: the submodule, else the package
            names = [f"{base}.{a.name}".lstrip(".") for a in node.names]
            names = [n if n in MODULES else base for n in names]
            out += [(n, id(node) in local) for n in dict.fromkeys(names) if n in MODULES]
        elif isinstance(node, ast.Import):
            out += [(a.name.split(".", 1)[1], id(node) in local) for a in node.names
                    if a.name.startswith("hift_cli.")]
    return out


def test_no_module_imports_one_that_imports_it_back():
    graph = {name: {m for m, _ in _imports(p)} - {name} for name, p in MODULES.items()}
    assert {"engine", "memory", "memory.arithmetic"} <= graph.keys()

    def reaches(start, goal, seen=()):
        return any(m == goal or (m not in seen and reaches(m, goal, (*seen, m)))
                   for m in graph.get(start, ()))

    circles = sorted(a for a in graph if reaches(a, a))
    assert not circles, f"modules on an import circle: {circles}"


def test_imports_are_at_module_level_outside_the_cli():
    local = [(name, m) for name, p in MODULES.items() if name not in LAZY_OK
             for m, inside in _imports(p) if inside]
    assert not local, f"function-local hift_cli imports: {local}"


def test_the_trainer_is_assembled_from_parts():
    """HiftTrainer lists its parts and builds them with build.py's builders; the class
    itself stays small (the step is update.py's, the rows meter.py's, the batches
    batches.py's, checkpoints saving.py's)."""
    tree = ast.parse((PACKAGE / "engine.py").read_text())
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "HiftTrainer"]
    assert cls.end_lineno - cls.lineno + 1 <= 350
    assert {"build", "batches", "meter", "saving", "update"} <= {
        m for m, _ in _imports(PACKAGE / "engine.py")}
    # setup() and the parts it sets up in methods of their own (setup_groups, setup_update)
    setup = [n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name.startswith("setup")]
    assert {"setup", "setup_groups", "setup_update"} <= {n.name for n in setup}
    called = {n.func.id for f in setup for n in ast.walk(f) if isinstance(n, ast.Call)
              and isinstance(n.func, ast.Name)}
    assert {"build_data", "build_model", "build_grouping", "build_plan", "build_optimizer",
            "build_store", "build_scheduler"} <= called


def test_the_estimate_is_a_package_of_small_modules():
    parts = {name: p for name, p in MODULES.items() if name.startswith("memory.")}
    assert set(parts) == {"memory.inputs", "memory.counting", "memory.activations",
                          "memory.sample", "memory.arithmetic", "memory.search",
                          "memory.report"}
    sizes = {name: len(p.read_text().splitlines()) for name, p in parts.items()}
    assert max(sizes.values()) <= 300, sizes


@pytest.mark.parametrize("module", ["checkpoint.py", "saving.py"])
def test_checkpoint_io_knows_nothing_of_the_trainer(module):
    """checkpoint.py writes and reads a state dict, saving.py decides what to write where
    (every rank's part, model/); what is in the state is the trainer's business
    (HiftTrainer.state_dict / load_state_dict)."""
    tree = ast.parse((PACKAGE / module).read_text())
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    names |= {a.arg for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)
              for a in n.args.args + n.args.kwonlyargs}
    assert not {"trainer", "engine", "HiftTrainer"} & names
    assert "engine" not in {m for m, _ in _imports(PACKAGE / module)}


def test_train_reads_in_about_a_screen():
    tree = ast.parse((PACKAGE / "engine.py").read_text())
    (train,) = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)
                and n.name == "train"]
    assert train.end_lineno - train.lineno + 1 <= 70


STORE_PROTOCOL = {"enabled", "strict", "pending", "prefetch", "wait", "updating", "release",
                  "flush", "synchronize", "readable", "load", "take_stats", "footprint",
                  "holds", "close"}


def test_the_state_store_is_used_through_its_protocol():
    """GroupStateStore's public names are its protocol (docs/concepts.md), and nothing in
    the package or the benchmarks reaches past it."""
    import torch

    from hift_cli.offload import GroupStateStore

    params = [[torch.nn.Parameter(torch.zeros(4))] for _ in range(3)]
    store = GroupStateStore(torch.optim.SGD([p for ps in params for p in ps], lr=0.1,
                                            momentum=0.9), params, torch.device("cpu"), True)
    assert {n for n in dir(store) if not n.startswith("_")} == STORE_PROTOCOL
    reach = re.compile(r"\bstore\._[a-z]")
    files = [*PACKAGE.rglob("*.py"), *(PACKAGE.parent / "bench").glob("*.py")]
    past = [p.name for p in files if p.name != "offload.py" and reach.search(p.read_text())]
    assert not past, f"private state-store names used in {past}"


def test_the_benchmarks_train_through_the_public_loop():
    """bench/ runs every method through HiftTrainer.train (the peers as update rules):
    no private trainer name, no metrics.jsonl or summary.json written by itself."""
    files = list((PACKAGE.parent / "bench").glob("*.py"))
    private = re.compile(r"\btrainer\.(_[a-z]\w*)")
    reached = {p.name: private.findall(p.read_text()) for p in files}
    assert not {k: v for k, v in reached.items() if v}, f"private trainer names: {reached}"
    writes = re.compile(r"(metrics\.jsonl|summary\.json)[\"']\)?\s*,?\s*[\"']?[wa]|"
                        r"(metrics\.jsonl|summary\.json)[\"']\)\.write_")
    written = [p.name for p in files if writes.search(p.read_text())]
    assert not written, f"metrics written outside hift's RunLog in {written}"
