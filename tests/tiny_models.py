"""Tiny random causal LMs of many architectures, built from configs (no download)."""

from __future__ import annotations

import torch
import transformers as tf

COMMON = dict(vocab_size=128, max_position_embeddings=128)


def _cfgs() -> dict:
    return {
        "llama": tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                num_attention_heads=4, num_key_value_heads=2, **COMMON),
        "qwen2": tf.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                num_attention_heads=4, num_key_value_heads=2, **COMMON),
        "mistral": tf.MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                    num_attention_heads=4, num_key_value_heads=2, **COMMON),
        "gemma3": tf.Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                      sliding_window=4, sliding_window_pattern=2,
                                      layer_types=["sliding_attention", "full_attention"] * 2,
                                      **COMMON),
        "gpt2": tf.GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=128, n_positions=128),
        "opt": tf.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=3,
                            num_attention_heads=4, word_embed_proj_dim=32, **COMMON),
        "gpt_neox": tf.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                     num_attention_heads=4, **COMMON),
        "phi": tf.PhiConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                            num_attention_heads=4, **COMMON),
        # current dense families
        "llama3": tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                 num_attention_heads=4, num_key_value_heads=1,
                                 rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0,
                                                  "factor": 8.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0,
                                                  "original_max_position_embeddings": 16},
                                 **COMMON),
        "gemma2": tf.Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                  sliding_window=4, attn_logit_softcapping=5.0,
                                  final_logit_softcapping=3.0,
                                  layer_types=["sliding_attention", "full_attention"] * 2,
                                  **COMMON),
        "phi3": tf.Phi3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                              **COMMON),
        "qwen3": tf.Qwen3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                **COMMON),
        "mistral_sw": tf.MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                       num_attention_heads=4, num_key_value_heads=2,
                                       sliding_window=4, **COMMON),
        "cohere": tf.CohereConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                                  bos_token_id=1, eos_token_id=2, **COMMON),
        "olmo2": tf.Olmo2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                                bos_token_id=1, eos_token_id=2, **COMMON),
    }


ARCHS = list(_cfgs())


def _build(cfg, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg.use_cache = False
    return tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")


def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    return _build(_cfgs()[arch], seed).eval()


def random_ids(n: int = 3, seqlen: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (n, seqlen), generator=g)


def tiny_tokenizer():
    """A character-level tokenizer with < 128 ids, built offline."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {"<unk>": 0, "<eos>": 1, **{ch: i + 2 for i, ch in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>",
                                   pad_token="<eos>")
    return fast


SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. Pruning removes weights from a network.\n"
    "Layer-wise sparsity allocation gives each block its own share of the budget.\n"
) * 40


def save_tiny(tmp_path, arch: str = "llama", seed: int = 0, model=None):
    """Save a tiny model (``model``, or ``tiny_model(arch, seed)``) + tokenizer folder and a text
    file; return (model_dir, text_file)."""
    model = model if model is not None else tiny_model(arch, seed)
    folder = tmp_path / f"tiny-{arch}"
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    text = tmp_path / "text.txt"
    text.write_text(SAMPLE_TEXT)
    return folder, text


def _moe_cfgs() -> dict:
    attn = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, **COMMON)
    return {
        "mixtral": tf.MixtralConfig(intermediate_size=32, num_local_experts=4,
                                    num_experts_per_tok=2, **attn),
        "qwen2_moe": tf.Qwen2MoeConfig(intermediate_size=64, moe_intermediate_size=32,
                                       shared_expert_intermediate_size=32, num_experts=4,
                                       num_experts_per_tok=2, decoder_sparse_step=1, **attn),
        "qwen3_moe": tf.Qwen3MoeConfig(intermediate_size=64, moe_intermediate_size=32,
                                       num_experts=4, num_experts_per_tok=2, head_dim=8,
                                       decoder_sparse_step=1, **attn),
        "olmoe": tf.OlmoeConfig(intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                                pad_token_id=0, bos_token_id=1, eos_token_id=2, **attn),
        # MLA attention (low-rank q and kv, one kv head per query head), shared experts
        "deepseek_v2": tf.DeepseekV2Config(intermediate_size=64, moe_intermediate_size=32,
                                           n_routed_experts=4, num_experts_per_tok=2,
                                           n_shared_experts=2, first_k_dense_replace=0,
                                           q_lora_rank=16, kv_lora_rank=16,
                                           qk_rope_head_dim=4, qk_nope_head_dim=4,
                                           v_head_dim=8, n_group=1, topk_group=1,
                                           **(attn | {"num_key_value_heads": 4})),
        # ... and a first dense block (first_k_dense_replace), grouped sigmoid routing
        "deepseek_v3": tf.DeepseekV3Config(intermediate_size=64, moe_intermediate_size=32,
                                           n_routed_experts=4, num_experts_per_tok=2,
                                           n_shared_experts=1, first_k_dense_replace=1,
                                           q_lora_rank=16, kv_lora_rank=16,
                                           qk_rope_head_dim=4, qk_nope_head_dim=4,
                                           v_head_dim=8, n_group=2, topk_group=1,
                                           **(attn | {"num_key_value_heads": 4,
                                                      "num_hidden_layers": 3})),
    }


MOE_ARCHS = list(_moe_cfgs())


def tiny_moe(arch: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random mixture-of-experts model (fused experts, as transformers stores them)."""
    model = _build(_moe_cfgs()[arch], seed)
    for module in model.modules():  # zero-initialised routers would route ties arbitrarily
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.nn.Parameter) and weight.dim() == 2 and not any(
                True for _ in module.children()) and weight.abs().sum() == 0:
            torch.nn.init.normal_(weight, std=0.5)
    return model.eval()


def save_tiny_moe(tmp_path, arch: str = "mixtral", seed: int = 0):
    """Save a tiny MoE model + tokenizer folder and a text file; return (model_dir, text_file)."""
    return save_tiny(tmp_path, arch, seed, model=tiny_moe(arch, seed))
