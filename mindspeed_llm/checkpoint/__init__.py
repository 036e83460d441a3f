"""Megatron checkpoint layout, HF <-> Megatron conversion, loading into GPTModel chunks, verification."""
from mindspeed_llm.checkpoint.errors import ConversionError
from mindspeed_llm.checkpoint.hf2mg import Hf2MgOptions, convert_hf_to_mg
from mindspeed_llm.checkpoint.load import load_checkpoint
from mindspeed_llm.checkpoint.mg2hf import Mg2HfOptions, convert_mg_to_hf, iter_hf_tensors

__all__ = ["ConversionError", "Hf2MgOptions", "Mg2HfOptions", "convert_hf_to_mg", "convert_mg_to_hf",
           "iter_hf_tensors", "load_checkpoint"]
