"""Tiny Hugging Face model directories shaped like published Qwen3 (and Qwen3-MoE / Qwen2.5 / Llama-3) checkpoints.

The tests and the quickstart share this builder. It writes what a user downloads from the Hub:
`config.json` spelled as the published checkpoints spell it, sharded `model-0000N-of-0000M.safetensors` with
`model.safetensors.index.json`, `generation_config.json`, and a byte-level BPE tokenizer trained here with
`tokenizers` that carries Qwen's special tokens (eos `<|im_end|>`, pad `<|endoftext|>`) and a chat template.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch

from mindspeed_llm import demo_data

# Control tokens are special (skipped when decoding); the tag tokens are plain added tokens, as in Qwen3.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TAG_TOKENS = ["<tool_call>", "</tool_call>", "<think>", "</think>", "<tool_response>", "</tool_response>"]
# The Llama-3 family names its control tokens differently; they are added on top for llama3-style models.
LLAMA3_TOKENS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

# A chat template with Qwen3's rendering rules: optional system and tools block, <think> kept only on
# assistant turns after the last user query, tool calls as <tool_call> JSON, tool results as a user turn,
# and an empty think block after the generation prompt when enable_thinking is false.
QWEN3_CHAT_TEMPLATE = r"""
{%- if tools %}
{{- '<|im_start|>system\n' }}
{%- if messages[0].role == 'system' %}{{- messages[0].content + '\n\n' }}{%- endif %}
{{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
{%- for tool in tools %}{{- "\n" }}{{- tool | tojson }}{%- endfor %}
{{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- set ns = namespace(last_query=messages|length - 1) %}
{%- for message in messages[::-1] %}
{%- set index = (messages|length - 1) - loop.index0 %}
{%- if message.role == 'user' and not (message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) and ns.last_query == messages|length - 1 %}
{%- set ns.last_query = index %}
{%- endif %}
{%- endfor %}
{%- for message in messages %}
{%- set content = message.content if message.content is string else '' %}
{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
{{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>\n' }}
{%- elif message.role == 'assistant' %}
{%- set reasoning = '' %}
{%- if message.reasoning_content is string %}
{%- set reasoning = message.reasoning_content %}
{%- elif '</think>' in content %}
{%- set reasoning = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
{%- set content = content.split('</think>')[-1].lstrip('\n') %}
{%- endif %}
{%- if loop.index0 > ns.last_query and (loop.last or reasoning) %}
{{- '<|im_start|>assistant\n<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
{%- else %}
{{- '<|im_start|>assistant\n' + content }}
{%- endif %}
{%- if message.tool_calls %}
{%- for tool_call in message.tool_calls %}
{%- if (loop.first and content) or (not loop.first) %}{{- '\n' }}{%- endif %}
{%- set call = tool_call.function if tool_call.function else tool_call %}
{{- '<tool_call>\n{"name": "' + call.name + '", "arguments": ' + (call.arguments if call.arguments is string else call.arguments | tojson) + '}\n</tool_call>' }}
{%- endfor %}
{%- endif %}
{{- '<|im_end|>\n' }}
{%- elif message.role == 'tool' %}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
{{- '\n<tool_response>\n' + content + '\n</tool_response>' }}
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\n' }}{%- endif %}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\n' }}
{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}
{%- endif %}
""".strip()

ARCHITECTURES = {"qwen3": "Qwen3ForCausalLM", "qwen3-moe": "Qwen3MoeForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "llama3": "LlamaForCausalLM"}
# Qwen3-MoE shape defaults (8 experts, 2 per token, expert width 32, every layer MoE, renormalised top-k).
MOE_DEFAULTS = {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "norm_topk_prob": True,
                "mlp_only_layers": (), "decoder_sparse_step": 1}


def build_tokenizer(out_dir: str | Path, vocab_size: int = 400, family: str = "qwen3") -> Path:
    """Train a byte-level BPE tokenizer on the demo corpus and save it as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[], show_progress=False)
    tok.train_from_iterator(demo_data.corpus(), trainer=trainer)
    specials = SPECIAL_TOKENS + (LLAMA3_TOKENS if family == "llama3" else [])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=specials[1:], clean_up_tokenization_spaces=False)
    fast.add_special_tokens({"additional_special_tokens": specials})
    fast.add_tokens(TAG_TOKENS)
    if family == "llama3":
        fast.bos_token = "<|begin_of_text|>"
    fast.chat_template = QWEN3_CHAT_TEMPLATE
    fast.model_max_length = 4096
    fast.save_pretrained(out)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "Qwen2Tokenizer" if family != "llama3" else "PreTrainedTokenizerFast"
    cfg["split_special_tokens"] = False
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    return out


def hf_config(family: str = "qwen3", *, vocab_size: int, num_layers: int = 4, hidden_size: int = 64,
              num_attention_heads: int = 4, num_key_value_heads: int = 2, head_dim: int = 16,
              intermediate_size: int = 128, tie_word_embeddings: bool = False, max_position_embeddings: int = 512,
              rope_theta: float = 1000000.0, dtype: str = "float32", eos_token_id: int = 0,
              bos_token_id: int | None = None, **moe) -> dict:
    """config.json as the published checkpoints spell it (`rope_theta` at top level, `torch_dtype`, Qwen3-MoE's
    `num_experts`); `moe` overrides `MOE_DEFAULTS` for "qwen3-moe"."""
    cfg = {
        "architectures": [ARCHITECTURES[family]],
        "attention_dropout": 0.0,
        "bos_token_id": bos_token_id if bos_token_id is not None else eos_token_id,
        "eos_token_id": eos_token_id,
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": max_position_embeddings,
        "model_type": {"qwen3": "qwen3", "qwen3-moe": "qwen3_moe", "qwen2": "qwen2", "llama3": "llama"}[family],
        "num_attention_heads": num_attention_heads,
        "num_hidden_layers": num_layers,
        "num_key_value_heads": num_key_value_heads,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": rope_theta,
        "tie_word_embeddings": tie_word_embeddings,
        "torch_dtype": dtype,
        "transformers_version": "4.51.0",
        "use_cache": True,
        "vocab_size": vocab_size,
    }
    if family in ("qwen3", "qwen3-moe"):
        cfg.update(attention_bias=False, head_dim=head_dim, max_window_layers=num_layers, sliding_window=None,
                   use_sliding_window=False)
    if family == "qwen3-moe":
        shape = {**MOE_DEFAULTS, **moe}
        cfg.update(shape, mlp_only_layers=list(shape["mlp_only_layers"]), output_router_logits=False,
                   router_aux_loss_coef=0.001)
    elif family == "qwen2":
        cfg.update(max_window_layers=num_layers, sliding_window=None, use_sliding_window=False)
    else:
        cfg.update(attention_bias=False, mlp_bias=False, head_dim=head_dim, pretraining_tp=1)
    return dict(sorted(cfg.items()))


def _random_state_dict(cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    """Random weights in HF naming; norms near 1 so activations stay well scaled."""
    g = torch.Generator().manual_seed(seed)
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim", h // heads)
    std = cfg["initializer_range"]

    def normal(*shape):
        return torch.randn(*shape, generator=g) * std

    def norm(n):
        return 1.0 + 0.1 * torch.randn(n, generator=g)

    sd = {"model.embed_tokens.weight": normal(v, h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = norm(h)
        sd[p + "self_attn.q_proj.weight"] = normal(heads * hd, h)
        sd[p + "self_attn.k_proj.weight"] = normal(kv * hd, h)
        sd[p + "self_attn.v_proj.weight"] = normal(kv * hd, h)
        if cfg["model_type"] == "qwen2":
            for name, rows in (("q", heads * hd), ("k", kv * hd), ("v", kv * hd)):
                sd[p + f"self_attn.{name}_proj.bias"] = normal(rows)
        sd[p + "self_attn.o_proj.weight"] = normal(h, heads * hd)
        if cfg["model_type"] == "qwen3":
            sd[p + "self_attn.q_norm.weight"] = norm(hd)
            sd[p + "self_attn.k_norm.weight"] = norm(hd)
        sd[p + "post_attention_layernorm.weight"] = norm(h)
        sd[p + "mlp.gate_proj.weight"] = normal(inter, h)
        sd[p + "mlp.up_proj.weight"] = normal(inter, h)
        sd[p + "mlp.down_proj.weight"] = normal(h, inter)
    sd["model.norm.weight"] = norm(h)
    if not cfg["tie_word_embeddings"]:
        sd["lm_head.weight"] = normal(v, h)
    return sd


def _save_moe_weights(cfg: dict, out_dir: Path, seed: int, dtype: torch.dtype, max_shard_bytes: int) -> None:
    """Random Qwen3-MoE weights written by transformers' own `save_pretrained`, so the files carry the names it
    publishes (it keeps each layer's experts fused in memory and splits them per expert on save). Norms near 1;
    the router at std 1/sqrt(hidden), so routing logits are O(1) and the top-k choice is clear-cut."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "torch_dtype",
                                                                         "transformers_version")})
    model = Qwen3MoeForCausalLM(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=g)
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * noise)
            elif name.endswith("mlp.gate.weight"):
                param.copy_(noise / math.sqrt(cfg["hidden_size"]))
            else:
                param.copy_(noise * cfg["initializer_range"])
    model.to(dtype).save_pretrained(out_dir, max_shard_size=max_shard_bytes)


def save_sharded_safetensors(state_dict: dict[str, torch.Tensor], out_dir: Path, max_shard_bytes: int) -> None:
    """Write `model-0000N-of-0000M.safetensors` shards and `model.safetensors.index.json`, as the Hub does."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state_dict.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += nbytes
    weight_map, total = {}, 0
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / fname), metadata={"format": "pt"})
        for name, t in shard.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def build_tiny_model(out_dir: str | Path, family: str = "qwen3", *, tie_word_embeddings: bool = False,
                     num_layers: int = 4, hidden_size: int = 64, num_attention_heads: int = 4,
                     num_key_value_heads: int = 2, head_dim: int = 16, intermediate_size: int = 128,
                     dtype: str = "float32", seed: int = 1234, max_shard_bytes: int = 200_000,
                     tokenizer_vocab_size: int = 400, **moe) -> Path:
    """Write a complete tiny HF model directory and return its path.

    `family` is one of "qwen3", "qwen3-moe" (shape `moe` over `MOE_DEFAULTS`), "qwen2" (QKV bias, no qk-norm)
    or "llama3". The model vocabulary is the tokenizer's length rounded up to a multiple of 64, as published
    checkpoints pad theirs.
    """
    if family not in ARCHITECTURES:
        raise ValueError(f"family must be one of {sorted(ARCHITECTURES)}, got {family!r}")
    if family == "qwen2":
        head_dim = hidden_size // num_attention_heads
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        build_tokenizer(tmp, vocab_size=tokenizer_vocab_size, family=family)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tmp)
        vocab_size = int(math.ceil(len(tok) / 64) * 64)
        cfg = hf_config(family, vocab_size=vocab_size, num_layers=num_layers, hidden_size=hidden_size,
                        num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
                        head_dim=head_dim, intermediate_size=intermediate_size,
                        tie_word_embeddings=tie_word_embeddings, dtype=dtype,
                        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                        bos_token_id=tok.bos_token_id if family == "llama3" else None, **moe)
        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
        if family == "qwen3-moe":
            _save_moe_weights(cfg, tmp, seed, torch_dtype, max_shard_bytes)
        else:
            sd = {k: v.to(torch_dtype) for k, v in _random_state_dict(cfg, seed).items()}
            save_sharded_safetensors(sd, tmp, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        gen = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": [cfg["eos_token_id"], tok.pad_token_id],
               "pad_token_id": tok.pad_token_id, "do_sample": False, "transformers_version": "4.51.0"}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.chmod(0o755)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
