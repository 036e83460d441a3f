"""Model families (declarative HF <-> megatron-core tables), config reading, our layer spec and model building."""
from mindspeed_llm.models.config import ConfigError, ModelConfig, read_hf_config, transformer_config
from mindspeed_llm.models.family import Family
from mindspeed_llm.models.placement import Placement, PlacementError, parse_layer_list, place_layers
from mindspeed_llm.models.registry import FAMILIES, family_for_config, get_family, load_model_config


def build_model(*args, **kwargs):
    """See `mindspeed_llm.models.build.build_model` (imported lazily: it pulls in megatron-core)."""
    from mindspeed_llm.models.build import build_model as _build

    return _build(*args, **kwargs)


__all__ = ["ConfigError", "ModelConfig", "Family", "FAMILIES", "Placement", "PlacementError", "build_model",
           "family_for_config", "get_family", "load_model_config", "parse_layer_list", "place_layers",
           "read_hf_config", "transformer_config"]
