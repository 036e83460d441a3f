"""`evaluation.py`: benchmark accuracy of a Megatron checkpoint (MindSpeed-LLM's evaluation entry)."""
