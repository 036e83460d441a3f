"""Fine-tuning on megatron-core: SFT dataset, batching, loss."""
