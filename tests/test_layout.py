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


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(hift_cli module imported, whether the import is inside a function)."""
    tree = ast.parse(path.read_text())
    local = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef,
             ast.AsyncFunctionDef)) for n in ast.walk(f)}
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and \
                node.module.split(".")[0] == "hift_cli":
            parts = node.module.split(".")
            names = [parts[1]] if len(parts) > 1 else [a.name for a in node.names]
            out += [(n, id(node) in local) for n in names if n in modules]
        elif isinstance(node, ast.Import):
            out += [(a.name.split(".")[1], id(node) in local) for a in node.names
                    if a.name.startswith("hift_cli.")]
    return out


def test_no_module_imports_one_that_imports_it_back():
    graph = {p.stem: {m for m, _ in _imports(p)} - {p.stem} for p in PACKAGE.glob("*.py")}

    def reaches(start, goal, seen=()):
        return any(m == goal or (m not in seen and reaches(m, goal, (*seen, m)))
                   for m in graph.get(start, ()))

    circles = sorted(a for a in graph if reaches(a, a))
    assert not circles, f"modules on an import circle: {circles}"


def test_imports_are_at_module_level_outside_the_cli():
    local = [(p.stem, m) for p in PACKAGE.glob("*.py") if p.stem not in LAZY_OK
             for m, inside in _imports(p) if inside]
    assert not local, f"function-local hift_cli imports: {local}"


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
    files = [*PACKAGE.glob("*.py"), *(PACKAGE.parent / "bench").glob("*.py")]
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
