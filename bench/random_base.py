"""A base model with SmolLM2's tokenizer and architecture and random weights, for a GPU machine that can
fetch no weights (bench/training.py --base). Speed and memory depend on the shapes, not on the values.

    python bench/random_base.py KIT_DIR DEST --shape 1.7b

KIT_DIR is an imported SmolLM2-135M folder without its weights (config, tokenizer, chat template):
`tuneforge models import-gguf` writes one. Shapes: 135m (that config as is) and 1.7b (SmolLM2-1.7B's:
2048 wide, 24 blocks, 8192-wide MLP, 32 heads, each with its own keys and values).
"""

import argparse
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

SHAPES = {
    "135m": {},
    "1.7b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 24,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "head_dim": 64,
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kit", type=Path)
    parser.add_argument("dest", type=Path)
    parser.add_argument("--shape", choices=list(SHAPES), default="135m")
    args = parser.parse_args()
    config = AutoConfig.from_pretrained(args.kit)
    for key, value in SHAPES[args.shape].items():
        setattr(config, key, value)
    torch.manual_seed(0)
    # Initialising 1.7B weights on a CPU takes minutes, on a GPU seconds.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(args.dest)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (args.kit / name).exists():
            shutil.copy(args.kit / name, args.dest / name)
    print(f"{args.dest}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters ({args.shape})")


if __name__ == "__main__":
    main()
