"""MindSpeed-LLM compatible module paths for model specs."""
