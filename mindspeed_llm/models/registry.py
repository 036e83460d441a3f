"""Family lookup by `--model-type-hf` name or by the `architectures` entry of config.json."""
from __future__ import annotations

from pathlib import Path

from mindspeed_llm.models.config import ConfigError, ModelConfig, read_hf_config
from mindspeed_llm.models.family import Family
from mindspeed_llm.models.llama import LLAMA
from mindspeed_llm.models.qwen2 import QWEN2
from mindspeed_llm.models.qwen3 import QWEN3, QWEN3_MOE

FAMILIES: tuple[Family, ...] = (QWEN3, QWEN3_MOE, QWEN2, LLAMA)


def family_names() -> list[str]:
    return sorted(alias for fam in FAMILIES for alias in fam.aliases)


def get_family(name: str) -> Family:
    for fam in FAMILIES:
        if name.lower() in fam.aliases:
            return fam
    raise ConfigError(f"--model-type-hf {name} is not supported; choose one of {', '.join(family_names())}")


def family_for_config(hf_config: dict, requested: str | None = None, source: str = "config.json") -> Family:
    """The family that reads this config; `requested` (a --model-type-hf) must agree with its architectures."""
    archs = hf_config.get("architectures") or []
    by_arch = next((f for f in FAMILIES if any(a in f.architectures for a in archs)), None)
    if by_arch is None:
        supported = sorted(a for f in FAMILIES for a in f.architectures)
        raise ConfigError(f"{source}: architectures {archs} is not a supported architecture "
                          f"(supported: {', '.join(supported)})")
    if requested is not None:
        fam = get_family(requested)
        if fam is not by_arch:
            raise ConfigError(f"--model-type-hf {requested} does not match {source} architectures {archs}; "
                              f"pass --model-type-hf {by_arch.name}")
    return by_arch


def load_model_config(model_dir: str | Path, requested: str | None = None) -> tuple[Family, ModelConfig]:
    """Read `model_dir/config.json` -> (family, ModelConfig)."""
    cfg = read_hf_config(model_dir)
    fam = family_for_config(cfg, requested, source=str(Path(model_dir) / "config.json"))
    return fam, fam.config(cfg)
