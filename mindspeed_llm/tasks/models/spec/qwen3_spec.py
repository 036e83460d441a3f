"""`--spec mindspeed_llm.tasks.models.spec.qwen3_spec layer_spec`: the Qwen3 layer (q/k RMSNorm, SDPA attention)."""
from mindspeed_llm.models.spec import get_layer_spec

layer_spec = get_layer_spec(qk_layernorm=True)
