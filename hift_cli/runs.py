"""A ``hift train`` run read back from disk: where its model is, the config that trained
it, and what it measured. ``hift generate`` formats prompts the way the run did;
``hift export`` writes the model card from it."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from hift_cli.config import checkpoint_dir

log = logging.getLogger(__name__)


@dataclass
class TrainedModel:
    path: Path
    """The Hugging Face folder: config.json, weights, tokenizer."""
    run: Path | None = None
    """The run dir it belongs to, as ``<run>/model`` or ``<run>/checkpoints/step-N``."""
    config: DictConfig | None = None
    """The run's ``config.yaml``."""
    summary: dict = field(default_factory=dict)
    """The run's ``summary.json``; only for its final ``model/`` (a checkpoint precedes
    those numbers)."""
    memory: dict = field(default_factory=dict)
    """The run's ``memory_report.json`` (parameters, units, groups)."""

    def setting(self, key: str, default: Any = None) -> Any:
        """A key of the run's config (``"hift.k"``), or ``default`` without one."""
        if self.config is None:
            return default
        return OmegaConf.select(self.config, key, default=default)


def trained_model(checkpoint: str) -> TrainedModel:
    """The model ``checkpoint`` names (a model folder, a checkpoint or a run dir) and, when
    it lies in a run dir, that run's records. Unreadable records count as absent."""
    path = checkpoint_dir(checkpoint)
    final = path.name == "model"
    run = path.parent if final else path.parents[1] if path.parent.name == "checkpoints" \
        else None
    if run is None or not (run / "config.yaml").is_file():
        return TrainedModel(path)
    return TrainedModel(path, run, _read(run / "config.yaml", OmegaConf.load),
                        (_read(run / "summary.json", _json) or {}) if final else {},
                        _read(run / "memory_report.json", _json) or {})


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _read(path: Path, load):
    if not path.is_file():
        return None
    try:
        return load(path)
    except Exception as e:
        log.warning(f"warning: {path} not read ({type(e).__name__})")
        return None
