"""MindSpeed-LLM compatible module paths."""
