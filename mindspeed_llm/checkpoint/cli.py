"""`convert_ckpt.py`: HF <-> Megatron checkpoint conversion and verification (MindSpeed-LLM flag names)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from mindspeed_llm.checkpoint.errors import ConversionError
from mindspeed_llm.errors import OneLineArgumentParser as _Parser

PROG = "convert_ckpt.py"


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Convert checkpoints between Hugging Face safetensors and the Megatron "
                                       "(megatron-core) torch layout. Add --verify to compare logits afterwards.")
    p.add_argument("--load-model-type", choices=["hf", "mg"], default="hf", help="source format (default hf)")
    p.add_argument("--save-model-type", choices=["hf", "mg"], default="mg", help="target format (default mg)")
    p.add_argument("--load-dir", required=True, type=Path, help="HF model dir (hf) or Megatron checkpoint root (mg)")
    p.add_argument("--save-dir", required=True, type=Path, help="Megatron checkpoint root (mg) or HF output dir (hf)")
    p.add_argument("--model-type-hf", default=None,
                   help="model family: qwen3, qwen3-moe, qwen25/qwen2, llama3/llama2 (default: from config.json "
                        "architectures)")
    p.add_argument("--target-tensor-parallel-size", type=_positive, default=None, help="TP of the output (hf -> mg)")
    p.add_argument("--target-pipeline-parallel-size", type=_positive, default=None, help="PP of the output (hf -> mg)")
    p.add_argument("--target-expert-parallel-size", type=_positive, default=None,
                   help="EP of the output (hf -> mg, MoE models): expert e goes to EP rank e // (experts / EP)")
    p.add_argument("--expert-tensor-parallel-size", type=_positive, default=None,
                   help="hf -> mg, MoE: 1 keeps every expert whole on each TP rank (only the (TP, EP) files that "
                        "coexist are written, as MindSpeed does); default: experts split over TP")
    p.add_argument("--moe-grouped-gemm", action="store_true",
                   help="MoE experts in megatron-core's GroupedMLP layout (hf -> mg; MindSpeed's mlp.experts."
                        "weight1/weight2); mg -> hf reads the layout from the checkpoint")
    p.add_argument("--num-layer-list", default=None, help="uneven PP: layers per stage, e.g. 7,21")
    p.add_argument("--num-layers-per-virtual-pipeline-stage", type=_positive, default=None,
                   help="VPP: layers per virtual chunk")
    p.add_argument("--noop-layers", default=None,
                   help="global indices of weightless no-op layers added to the Megatron numbering, e.g. 94,95 "
                        "(hf -> mg; mg -> hf reads them from the checkpoint)")
    p.add_argument("--params-dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="cast weights (hf -> mg); default keeps the checkpoint's dtype")
    p.add_argument("--hf-cfg-dir", type=Path, default=None,
                   help="mg -> hf: copy config.json and tokenizer files from this HF directory")
    p.add_argument("--verify", action="store_true", help="after converting, compare logits with transformers")
    p.add_argument("--verify-threshold", type=float, default=1e-3, help="max-abs logits difference allowed")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="--verify: let transformers run Python code shipped in the HF directory (auto_map)")
    lora = p.add_argument_group("LoRA (mg -> hf)")
    lora.add_argument("--lora-load", type=Path, default=None,
                      help="LoRA checkpoint (same TP/PP layout as --load-dir) whose adapters are merged in")
    lora.add_argument("--lora-r", type=int, default=None, help="adapter rank (default: from the LoRA checkpoint)")
    lora.add_argument("--lora-alpha", type=float, default=None,
                      help="adapter alpha, scale alpha/r (default: from the LoRA checkpoint)")
    lora.add_argument("--lora-target-modules", nargs="+", default=None, metavar="MODULE",
                      help="adapted megatron layers (default: from the LoRA checkpoint)")
    lora.add_argument("--save-lora-to-hf", action="store_true",
                      help="write only the adapters, as a PEFT adapter directory (adapter_model.safetensors, "
                           "adapter_config.json), instead of merged weights")
    lora.add_argument("--lora-ignore-base-mismatch", action="store_true",
                      help="merge or export the --lora-load adapters even though --load-dir is not the base they "
                           "were trained on (by its weights' fingerprint)")
    # Accepted for compatibility with MindSpeed-LLM v1 recipes; they do not change the result.
    compat = p.add_argument_group("compatibility (accepted, no effect)")
    compat.add_argument("--tokenizer-model", default=None)
    compat.add_argument("--use-mcore-models", action="store_true")
    compat.add_argument("--model-type", choices=["GPT"], default="GPT")
    compat.add_argument("--spec", nargs=2, metavar=("MODULE", "ATTR"), default=None)
    compat.add_argument("--transformer-impl", choices=["local"], default="local")
    compat.add_argument("--save-layer-by-layer", action="store_true", help="always on: conversion streams")
    compat.add_argument("--make-vocab-size-divisible-by", type=int, default=1)
    return p


def build_verify_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=f"{PROG} verify", description="Compare a Megatron checkpoint with its HF model (logits).")
    p.add_argument("--hf-dir", "--load-dir", dest="hf_dir", required=True, type=Path)
    p.add_argument("--mg-dir", "--save-dir", dest="mg_dir", required=True, type=Path)
    p.add_argument("--model-type-hf", default=None)
    p.add_argument("--threshold", type=float, default=1e-3)
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let transformers run Python code shipped in the HF directory (auto_map)")
    return p


def _run_verify(hf_dir: Path, mg_dir: Path, model_type_hf: Optional[str], threshold: float,
                trust_remote_code: bool = False) -> int:
    from mindspeed_llm.checkpoint.verify import verify

    result = verify(hf_dir, mg_dir, model_type_hf=model_type_hf, threshold=threshold,
                    trust_remote_code=trust_remote_code)
    return 0 if result.ok else 3


def _apply_flag_policy(parser: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """Compatibility flags: one notice line each; values we cannot honour: a user error naming them."""
    from mindspeed_llm import flag_policy
    from mindspeed_llm.explicit import explicit_of

    flag_policy.apply("convert", parser, a, explicit_of(a, parser), "this device (conversion runs on the CPU)",
                      lambda msg: print(f"{PROG}: {msg}", file=sys.stderr))


def run(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["verify"]:
        a = build_verify_parser().parse_args(argv[1:])
        return _run_verify(a.hf_dir, a.mg_dir, a.model_type_hf, a.threshold, a.trust_remote_code)
    parser = build_parser()
    a = parser.parse_args(argv)
    _apply_flag_policy(parser, a)
    if a.trust_remote_code and not a.verify:
        print(f"{PROG}: notice: --trust-remote-code has no effect without --verify (conversion itself reads only "
              f"config.json and safetensors)", file=sys.stderr)
    from mindspeed_llm.models.placement import parse_layer_list

    layer_list = parse_layer_list(a.num_layer_list)
    if (a.load_model_type, a.save_model_type) == ("hf", "mg"):
        from mindspeed_llm.checkpoint.hf2mg import Hf2MgOptions, convert_hf_to_mg

        if a.hf_cfg_dir is not None:
            raise ConversionError("--hf-cfg-dir is only used by mg -> hf; drop it")
        lora_flags = [f for f, v in (("--lora-load", a.lora_load), ("--lora-r", a.lora_r),
                                     ("--lora-alpha", a.lora_alpha), ("--lora-target-modules", a.lora_target_modules),
                                     ("--save-lora-to-hf", a.save_lora_to_hf),
                                     ("--lora-ignore-base-mismatch", a.lora_ignore_base_mismatch)) if v]
        if lora_flags:
            raise ConversionError(f"{lora_flags[0]} is only used by mg -> hf (merging or exporting adapters); "
                                  f"hf -> mg converts the base model, and LoRA training adds the adapters")
        convert_hf_to_mg(Hf2MgOptions(load_dir=a.load_dir, save_dir=a.save_dir, model_type_hf=a.model_type_hf,
                                      tp=a.target_tensor_parallel_size or 1, pp=a.target_pipeline_parallel_size or 1,
                                      ep=a.target_expert_parallel_size or 1,
                                      num_layer_list=layer_list,
                                      layers_per_vpp_stage=a.num_layers_per_virtual_pipeline_stage,
                                      params_dtype=a.params_dtype, grouped_gemm=a.moe_grouped_gemm,
                                      etp=a.expert_tensor_parallel_size, noop_layers=a.noop_layers))
        return _run_verify(a.load_dir, a.save_dir, a.model_type_hf, a.verify_threshold,
                           a.trust_remote_code) if a.verify else 0
    if (a.load_model_type, a.save_model_type) == ("mg", "hf"):
        from mindspeed_llm.checkpoint.mg2hf import Mg2HfOptions, convert_mg_to_hf

        if a.params_dtype is not None:
            raise ConversionError("--params-dtype is only used by hf -> mg (mg -> hf keeps the saved dtype); drop it")
        if a.verify and (a.lora_load or a.save_lora_to_hf):
            raise ConversionError("--verify compares the export with --load-dir's own weights; it cannot check a "
                                  "LoRA merge or adapter export (drop --verify)")
        if a.verify and a.hf_cfg_dir is None:
            raise ConversionError("--verify on mg -> hf needs --hf-cfg-dir (the exported directory needs config.json)")
        convert_mg_to_hf(Mg2HfOptions(load_dir=a.load_dir, save_dir=a.save_dir, hf_cfg_dir=a.hf_cfg_dir,
                                      model_type_hf=a.model_type_hf, tp=a.target_tensor_parallel_size,
                                      pp=a.target_pipeline_parallel_size, ep=a.target_expert_parallel_size,
                                      grouped_gemm=True if a.moe_grouped_gemm else None,
                                      etp=a.expert_tensor_parallel_size,
                                      num_layer_list=layer_list,
                                      layers_per_vpp_stage=a.num_layers_per_virtual_pipeline_stage,
                                      noop_layers=a.noop_layers, lora_load=a.lora_load, lora_r=a.lora_r, lora_alpha=a.lora_alpha,
                                      lora_target_modules=a.lora_target_modules, save_lora_to_hf=a.save_lora_to_hf,
                                      lora_ignore_base_mismatch=a.lora_ignore_base_mismatch))
        return _run_verify(a.save_dir, a.load_dir, a.model_type_hf, a.verify_threshold,
                           a.trust_remote_code) if a.verify else 0
    raise ConversionError(f"--load-model-type {a.load_model_type} --save-model-type {a.save_model_type}: this "
                          f"conversion is not supported (use hf -> mg or mg -> hf)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit status of one conversion: 0, 2 after one `error:` line for bad input (also usage errors), 3 when
    --verify finds a mismatch, 130 when interrupted."""
    from mindspeed_llm.logs import exit_status, quiet_expected_warnings

    quiet_expected_warnings()
    return exit_status(lambda: run(argv))
