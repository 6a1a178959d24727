"""The config reference (docs/config.md), generated from the typed schema in config.py.

    python -m hift_cli.reference > docs/config.md

A test regenerates it and compares, so the document cannot drift from the code.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect

from hift_cli import config

SECTIONS = [("model", config.ModelConfig), ("data", config.DataConfig),
            ("hift", config.HiftConfig), ("trainer", config.TrainerConfig),
            ("eval", config.EvalConfig), ("memprofile", config.MemprofileConfig),
            ("generate", config.GenerateConfig), ("export", config.ExportConfig)]


def field_docs(cls) -> dict[str, str]:
    """The string literal written under each dataclass field (its docstring)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:] + [None]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None),
                                                        ast.Constant):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    if value == "???":
        return "(required)"
    text = repr(value).replace("\n", "\\n")
    return f"`{text if len(text) < 40 else text[:37] + '...'}`"


def markdown() -> str:
    lines = [
        "# Config reference",
        "",
        "Generated from `hift_cli/config.py` by `python -m hift_cli.reference`; a test keeps",
        "it in step with the code. Set any key on the command line (`trainer.max_steps=200`),",
        "pick a group option (`optimizer=sgd`), or a preset (`recipe=tiny`). Recipes set",
        "their own values over these defaults: `hift train recipe=<r> --cfg job` shows the",
        "result.",
        "",
        "`optimizer` is any optimizer class by `_target_` with its own keyword arguments",
        "(`lr`, `weight_decay` and, e.g., `betas`); shipped options: "
        + ", ".join(f"`{n}`" for n in ("adamw", "sgd", "adafactor", "adamw8bit",
                                       "paged_adamw8bit")) + ".",
        "",
        "Top level: `recipe=<name>`; `checkpoint=<dir>` (hift eval, generate, export: a model"
        " or run folder); `prompt=<text>` (hift generate); `resume=latest|<run>|<checkpoint>`"
        " (hift train).",
    ]
    for name, cls in SECTIONS:
        docs = field_docs(cls)
        lines += ["", f"## `{name}`", "", "| key | default | meaning |", "|---|---|---|"]
        for f in dataclasses.fields(cls):
            meaning = docs.get(f.name, "").replace("``", "`").replace("|", "\\|")
            lines.append(f"| `{name}.{f.name}` | {_default(f)} | {meaning} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")


def error_messages() -> list[tuple[str, str]]:
    """Every one-line error hift raises, as (module, template with … for the variable parts).

    docs/troubleshooting.md must list each of them (a test checks).
    """
    from pathlib import Path

    found = []
    for path in sorted(Path(__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and node.args and getattr(node.func, "id", None)
                    in ("ConfigError", "CheckpointError", "TrainingStopped")):
                continue
            parts: list[str] = []

            def walk(arg) -> None:
                if isinstance(arg, ast.Constant):
                    parts.append(str(arg.value))
                elif isinstance(arg, ast.JoinedStr):
                    for v in arg.values:
                        parts.append(v.value if isinstance(v, ast.Constant) else "…")
                else:
                    parts.append("…")

            walk(node.args[0])
            template = "".join(parts)
            if template.strip("…"):  # skip pass-throughs of other libraries' messages
                found.append((path.stem, template))
    return found
