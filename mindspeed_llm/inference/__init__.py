"""Generation on megatron-core: KV-cache decoding (greedy, sampling, beam search) at TP/PP, chat and batch files."""
