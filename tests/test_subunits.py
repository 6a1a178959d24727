"""Sub-units: units larger than hift.max_unit_params cut into rows of their matrices.

The model here is the tiny LLaMA with a 2048-token vocabulary: its embeddings (131,072
parameters) and head (131,136) are 3.5 blocks (36,992) each, the shape of Llama-3-8B's
problem at toy size. By default each is cut into 4 sub-units.
"""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, BertConfig, LlamaConfig

from helpers import assert_resume_is_exact, assert_same, build_trainer, snapshot
from hift_cli import build as build_mod
from hift_cli.checkpoint import CheckpointError
from hift_cli.config import ASSETS_DIR
from hift_cli.grouping import Group, find_units, make_groups, split_units

VOCAB = 2048
BLOCK = 36_992  # a tiny LLaMA block's parameters


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """The tiny LLaMA's folder with a 2048-token vocabulary (ids above 383 never occur)."""
    folder = tmp_path_factory.mktemp("wide") / "tiny_llama_wide"
    shutil.copytree(ASSETS_DIR / "tiny_llama", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": VOCAB}))
    return str(folder)


def make(wide, path, *overrides):
    return build_trainer(path, f"model.name_or_path={wide}", "data.max_eval_samples=4",
                         "trainer.max_steps=12", "hift.offload=true", *overrides)


# ------------------------------------------------------------------ cutting units
def check_cut(units, subs, limit):
    """Every parameter's rows are covered exactly once, in order; no sub-unit is over the
    limit by more than one row; sub-units keep their unit's order and name."""
    covered = {}
    for sub in subs:
        for piece in sub.pieces:
            covered.setdefault(piece.name, []).append((piece.start, piece.stop))
    for unit in units:
        for name, p in unit.params.items():
            rows = p.shape[0] if p.dim() else 1
            ranges = covered.pop(name)
            assert ranges[0][0] == 0 and ranges[-1][1] == rows, name
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])), name
    assert not covered
    for sub in subs:
        widest = max(p.numel() // p.shape[0] for p in sub.params.values() if p.dim())
        assert sub.numel <= limit + widest, sub.name
    for unit in units:
        parts = [s for s in subs if (s.parent or s.name) == unit.name]
        assert sum(s.numel for s in parts) == unit.numel
        if unit.numel > limit:
            assert [s.name for s in parts] == [f"{unit.name}.{i}" for i in range(len(parts))]
            assert len(parts) == -(-unit.numel // limit)  # the fewest
        else:
            assert parts == [unit]


@pytest.mark.parametrize("config", [
    LlamaConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2),
    LlamaConfig(vocab_size=999, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    BertConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=300),
], ids=["llama", "llama-tied", "bert"])
@pytest.mark.parametrize("limit", [5_000, 11_111, 40_000])
def test_units_are_cut_into_whole_rows_of_at_most_the_limit(config, limit):
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config) if config.model_type == "llama" else \
            __import__("transformers").AutoModelForSequenceClassification.from_config(config)
    units = find_units(model)
    subs = split_units(units, limit)
    check_cut(units, subs, limit)
    if config.model_type == "llama" and config.tie_word_embeddings:
        # The shared weight is cut where it first appears; the head keeps the final norm.
        assert [s.name for s in subs][-1] == "head" and subs[-1].numel == 32


def test_wide_model_units_and_default_limit(wide, tmp_path):
    trainer = make(wide, tmp_path, "hift.m=1")
    names = [u.name for u in trainer.units]
    assert names == [*(f"embeddings.{i}" for i in range(4)),
                     *(f"block.{i}" for i in range(4)), *(f"head.{i}" for i in range(4))]
    assert max(u.numel for u in trainer.units) == BLOCK
    rows = [(u.pieces[-1].start, u.pieces[-1].stop) for u in trainer.units[:4]]
    assert rows == [(0, 512), (512, 1024), (1024, 1536), (1536, 2048)]


# ------------------------------------------------------------------ the same numbers
def parents_grouped_like_the_unsplit_run(monkeypatch):
    """Groups of sub-units with every sub-unit in its unit's group of the unsplit run
    (contiguous k=3: embeddings+block.0, block.1+block.2, block.3+head)."""
    def build_groups(cfg, units):
        parents = list(dict.fromkeys(u.parent or u.name for u in units))
        plan = make_groups([type("U", (), {"name": p})() for p in parents], "bottom2up", 3,
                           None)
        return [Group(i, [u for u in units if (u.parent or u.name) in
                          {p.name for p in g.units}]) for i, g in enumerate(plan)]
    monkeypatch.setattr(build_mod, "build_groups", build_groups)


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed"])
@pytest.mark.parametrize("optimizer", ["adamw", "sgd", "adafactor"])
def test_every_sub_unit_in_one_group_trains_exactly_as_the_unit(wide, tmp_path, monkeypatch,
                                                                optimizer, precision):
    common = (f"optimizer={optimizer}", f"trainer.precision={precision}", "hift.k=3",
              "trainer.max_grad_norm=0.5")
    whole = make(wide, tmp_path / "whole", *common, "hift.max_unit_params=null")
    whole.train(6, evaluate=False)
    parents_grouped_like_the_unsplit_run(monkeypatch)
    cut = make(wide, tmp_path / "cut", *common)
    assert len(cut.units) == 12 and [len(g.units) for g in cut.groups] == [5, 2, 5]
    assert cut.store.enabled and cut.store.strict
    cut.train(6, evaluate=False)
    assert_same(snapshot(whole), snapshot(cut))


# ------------------------------------------------------------------ rows that train
def one_sgd_step(wide, tmp_path, precision, *overrides):
    """The trainer after one step of plain SGD on one batch, the weights before it, the
    batch, and the dense gradient of every parameter on that batch (the plain HF loss)."""
    trainer = make(wide, tmp_path, "optimizer=sgd", "optimizer.momentum=0",
                   "optimizer.lr=0.5", "trainer.max_grad_norm=null", "hift.m=1",
                   "trainer.lr_scheduler=constant", "model.loss_chunk_tokens=7",
                   f"trainer.precision={precision}", *overrides)
    batch = next(trainer.stream.batches)
    # The same computation as the trainer's (bf16-mixed: in bf16), every gradient dense.
    reference = AutoModelForCausalLM.from_config(trainer.model.config,
                                                 dtype=trainer.model.dtype)
    reference.load_state_dict(trainer.model.state_dict())
    reference(**batch).loss.backward()
    grads = {n: p.grad.float() for n, p in reference.named_parameters()}
    with trainer.store.readable():  # fp32 weights (bf16-mixed: its fp32 masters)
        weights = {n: (trainer.masters.by_id.get(id(p), p) if trainer.masters else p
                       ).detach().float().clone() for n, p in trainer.model.named_parameters()}
    if trainer.masters:  # split parameters have no whole master: rebuild them from rows
        for pieces in trainer.update.all_pieces():
            for pc, m in zip(pieces, trainer.masters.of(pieces)):
                with trainer.store.readable():
                    weights[pc.name][pc.start:pc.stop] = m.detach()
    trainer.train(1, evaluate=False, batches=[batch])
    return trainer, weights, grads


# bf16-mixed: the sparse rows' sums and the chunked head run in another order than the
# dense bf16 reference: a few bf16 roundings apart.
@pytest.mark.parametrize("precision,tol", [("fp32", 1e-5), ("bf16-mixed", 2e-2)])
@pytest.mark.parametrize("strategy,rows,name", [
    ("bottom2up", (0, 512), "model.embed_tokens.weight"),  # a sparse embedding gradient
    ("top2down", (1536, 2048), "lm_head.weight"),  # the chunked loss's rows
])
def test_a_sub_unit_updates_its_rows_by_their_gradient(wide, tmp_path, precision, tol,
                                                       strategy, rows, name):
    trainer, before, grads = one_sgd_step(wide, tmp_path, precision,
                                          f"hift.strategy={strategy}")
    a, b = rows
    with trainer.store.readable():
        (piece,) = trainer.groups[trainer.schedule.group_at(0)].pieces
        (after,) = trainer.masters.of([piece])
        after = after.detach().float()
    assert (piece.name, piece.start, piece.stop) == (name, a, b)
    # The rows' gradient came without a dense one: a sparse embedding, the loss's rows.
    assert trainer.model.get_input_embeddings().sparse == (strategy == "bottom2up")
    assert trainer.loss.rows == ({} if strategy == "bottom2up"
                                 else {id(piece.param): [(a, b)]})
    want = before[name][a:b] - 0.5 * grads[name][a:b]
    scale = 0.5 * grads[name][a:b].abs().max()
    torch.testing.assert_close(after, want, rtol=tol, atol=tol * scale)
    assert grads[name][a:b].abs().sum() > 0
    model = dict(trainer.model.named_parameters())
    for other, p in model.items():  # nothing else moved: other rows, other parameters
        keep = torch.ones(p.shape[0], dtype=torch.bool)
        if other == name:
            keep[a:b] = False
        assert torch.equal(p.detach().float()[keep], before[other][keep].to(p.dtype).float())


# ------------------------------------------------------------------ checkpoints
def test_resume_mid_cycle_with_sub_units_is_exact(wide, tmp_path):
    opts = ("hift.m=2", "hift.strategy=random", "trainer.precision=bf16-mixed",
            "trainer.lr_scheduler=linear")

    def trainer(name):
        made = make(wide, tmp_path / name, *opts)
        assert any(not pc.whole for g in made.groups for pc in g.pieces)  # rows of a matrix
        return made

    path = assert_resume_is_exact(trainer, tmp_path, 5)

    other = make(wide, tmp_path / "other", *opts, "hift.max_unit_params=null")
    with pytest.raises(CheckpointError, match=r"was saved with 6 group\(s\) \(embeddings.0,"
                       r"embeddings.1; .*this run has 3 group\(s\).*hift.max_unit_params"):
        other.resume(path)
