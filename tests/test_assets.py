"""The tiny model and data shipped in hift_cli/assets are what the generator writes."""

import json

from make_tiny_assets import make_instructions

from hift_cli.config import ASSETS_DIR


def test_shipped_instructions_match_the_generator():
    shipped = [json.loads(line) for line in open(ASSETS_DIR / "tiny_instructions.jsonl")]
    assert shipped == make_instructions()
    assert len(shipped) == 256


def test_tiny_model_config():
    config = json.load(open(ASSETS_DIR / "tiny_llama" / "config.json"))
    assert (config["model_type"], config["num_hidden_layers"], config["vocab_size"]) == \
        ("llama", 4, 384)
