"""Small real models created on disk for tests and benchmarks (no model hub here).

The classifiers are ``Qwen2ForSequenceClassification`` with one label: the architecture real reward
models (Skywork-Reward-V2 and others) use. Their heads have 64-dimensional attention heads, which
the vLLM CPU attention kernels need. They borrow the embedded SmolLM2 tokenizer.
"""

from __future__ import annotations

from pathlib import Path


def make_tiny_classifier(target: Path, tokenizer_dir: Path, *, seed: int = 0, layers: int = 2) -> Path:
    """Save a randomly initialised 2-layer reward model (hidden 128, 2 heads of 64) to ``target``."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForSequenceClassification

    if (target / "config.json").exists():
        return target
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = Qwen2ForSequenceClassification(config)
    with torch.no_grad():
        # Unit-scale logits, as trained reward models give: different texts get clearly different
        # scores, and bfloat16 (whose spacing grows with magnitude) can still be checked to 0.02.
        model.score.weight.normal_(0.0, 0.1)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def make_backbone_classifier(target: Path, causal_lm_dir: Path, *, seed: int = 0) -> Path:
    """A reward model with a real backbone (the embedded SmolLM2) and a random scalar head."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForSequenceClassification

    if (target / "config.json").exists():
        return target
    lm = AutoModelForCausalLM.from_pretrained(causal_lm_dir, dtype=torch.float32)
    config = lm.config
    config.num_labels = 1
    config.architectures = ["LlamaForSequenceClassification"]
    tokenizer = AutoTokenizer.from_pretrained(causal_lm_dir)
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(config)
    model.model.load_state_dict(lm.model.state_dict())
    with torch.no_grad():
        model.score.weight.normal_(0.0, 0.05)
    model.to(torch.bfloat16).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def make_tiny_policy(target: Path, tokenizer_dir: Path, *, seed: int = 0) -> Path:
    """A randomly initialised 2-layer chat policy (Qwen2 architecture) with the SmolLM2 tokenizer."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    if (target / "config.json").exists():
        return target
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=True,
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id
    )
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target
