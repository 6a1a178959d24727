"""One Hugging Face Trainer + HiFT run on the tiny model, for test_integrations.py's
data-parallel test: ``python hf_worker.py OUT BATCH`` alone, or under torchrun (each rank
BATCH samples a step). Writes each rank's final weights and rank 0's log lines to OUT."""

import json
import sys

import torch
from torch.utils.data import SequentialSampler
from transformers import Trainer, TrainingArguments, set_seed

from hift_cli.build import build_data
from hift_cli.config import compose
from hift_cli.data import collate
from hift_cli.integrations import HiFT
from hift_cli.models import load_model, load_tokenizer, resolve

STEPS = 6


class InOrder(Trainer):
    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


def main(out: str, batch: int) -> None:
    cfg = compose(["recipe=tiny"])
    path = resolve(cfg.model.name_or_path)
    tokenizer = load_tokenizer(path)
    set_seed(0)
    model = load_model(cfg.model, path, tokenizer.pad_token_id, "float32")
    rows = build_data(cfg, tokenizer, torch.device("cpu")).train_set.with_format(None)
    args = TrainingArguments(
        output_dir=out, per_device_train_batch_size=batch, max_steps=STEPS,
        learning_rate=0.5, lr_scheduler_type="constant", logging_steps=1, report_to=[],
        use_cpu=True, remove_unused_columns=False, dataloader_num_workers=0,
        disable_tqdm=True, save_strategy="no", seed=0)
    trainer = InOrder(model=model, args=args, train_dataset=[rows[i] for i in range(32)],
                      data_collator=lambda items: collate(items, tokenizer.pad_token_id))
    # SGD, not Adam: it moves the weights in proportion to the gradient, so a wrong
    # average across ranks shows.
    HiFT(k=3, always_active=["head"], optimizer={"_target_": "torch.optim.SGD"}).attach(trainer)
    trainer.train()
    torch.save(model.state_dict(), f"{out}/weights-rank{trainer.args.process_index}.pt")
    if trainer.args.process_index == 0:
        with open(f"{out}/log.json", "w") as f:
            json.dump([r for r in trainer.state.log_history if "loss" in r], f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
