"""Write a randomly initialized causal LM with the shape of a public model, for timing.

    python benchmarks/shaped_model.py --shape llama-3.2-1b --out /tmp/llama-1b-shape
    python benchmarks/step_cost.py --model /tmp/llama-1b-shape --batch-size 8 --max-length 256

Step time and peak memory do not depend on the weights' values, so a machine that cannot download
a model can still time the defenses at that model's size. The tokenizer (and so the vocabulary
size) is the embedded default's (SmolLM2, 49152 tokens; --tokenizer takes any local model
directory): a real Llama-3 has 128256, so its embedding and output layers are larger than here
and its absolute step time somewhat higher; the ratios to SFT are what the shape is for.
The weights are random (seed 0) and the answers meaningless: never evaluate such a model.
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# the published configs' layer shapes (hidden, intermediate, layers, heads, kv heads, tied)
SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    "llama-3.2-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                         num_attention_heads=24, num_key_value_heads=8, tie_word_embeddings=True),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", required=True, choices=sorted(SHAPES))
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokenizer", default="smollm2-135m-instruct",
                        help="model spec whose tokenizer and chat template the model gets")
    parser.add_argument("--dtype", default="bfloat16", help="dtype the weights are saved in")
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from inoculate.models import _resolve_spec, resolve_dtype

    tok = AutoTokenizer.from_pretrained(_resolve_spec(args.tokenizer)[1])
    config = LlamaConfig(vocab_size=len(tok), max_position_embeddings=4096, rope_theta=500000.0,
                         rms_norm_eps=1e-5, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, **SHAPES[args.shape])
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # initializing 8B on a CPU takes minutes
    with torch.device(device):
        model = LlamaForCausalLM(config).to(resolve_dtype(args.dtype))
    model.save_pretrained(args.out, safe_serialization=True)
    tok.save_pretrained(args.out)
    print(f"{args.out}: {args.shape} shape, {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B "
          f"parameters, random weights, {args.dtype}")


if __name__ == "__main__":
    main()
