"""Regenerate hift_cli/assets/{tiny_llama,tiny_instructions.jsonl}.

    python tests/make_tiny_assets.py

The tiny model is a 4-block LLaMA config with ByT5's byte-level tokenizer (no vocabulary
file needed); the data are short deterministic Alpaca-format tasks. test_assets.py checks
the shipped files are exactly what this script writes.
"""

import json
import random
import sys
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "hift_cli" / "assets"
WORDS = (
    "apple river stone cloud tiger lemon piano forest candle rocket garden silver "
    "window bridge planet orange spider butter marble castle"
).split()


def make_instructions(n: int = 256, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        kind = rng.randrange(5)
        word = rng.choice(WORDS)
        a, b = rng.randrange(10, 60), rng.randrange(1, 40)
        if kind == 0:
            rows.append({"instruction": "Reverse the word.", "input": word, "output": word[::-1]})
        elif kind == 1:
            rows.append({"instruction": "Write the word in capital letters.", "input": word,
                         "output": word.upper()})
        elif kind == 2:
            rows.append({"instruction": f"Add {a} and {b}.", "input": "", "output": str(a + b)})
        elif kind == 3:
            rows.append({"instruction": f"Subtract {b} from {a}.", "input": "",
                         "output": str(a - b)})
        else:
            rows.append({"instruction": "Count the letters in the word.", "input": word,
                         "output": str(len(word))})
    return rows


def main() -> None:
    from transformers import ByT5Tokenizer, LlamaConfig

    model_dir = ASSETS / "tiny_llama"
    config = LlamaConfig(
        vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=1, pad_token_id=0,
    )
    config.save_pretrained(model_dir)
    ByT5Tokenizer().save_pretrained(model_dir)
    with open(ASSETS / "tiny_instructions.jsonl", "w") as f:
        for row in make_instructions():
            f.write(json.dumps(row) + "\n")
    print(f"wrote {model_dir} and {ASSETS / 'tiny_instructions.jsonl'}", file=sys.stderr)


if __name__ == "__main__":
    main()
