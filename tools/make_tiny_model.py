"""Write a tiny Qwen3-shaped Hugging Face model directory (random weights, trained BPE tokenizer)."""
import argparse

from mindspeed_llm.tiny import ARCHITECTURES, build_tiny_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True, help="output directory (replaced if it exists)")
    p.add_argument("--family", default="qwen3", choices=sorted(ARCHITECTURES))
    p.add_argument("--tie-word-embeddings", action="store_true")
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--num-attention-heads", type=int, default=4)
    p.add_argument("--num-key-value-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=16)
    p.add_argument("--intermediate-size", type=int, default=128)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=1234)
    a = p.parse_args()
    path = build_tiny_model(a.out, a.family, tie_word_embeddings=a.tie_word_embeddings, num_layers=a.num_layers,
                            hidden_size=a.hidden_size, num_attention_heads=a.num_attention_heads,
                            num_key_value_heads=a.num_key_value_heads, head_dim=a.head_dim,
                            intermediate_size=a.intermediate_size, dtype=a.dtype, seed=a.seed)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
