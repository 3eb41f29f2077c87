"""Small real models created on disk for tests and benchmarks (no model hub here).

The classifiers are ``Qwen2ForSequenceClassification`` with one label: the architecture real reward
models (Skywork-Reward-V2 and others) use; the multi-objective one has a label per objective
(HelpSteer2's attributes by default). Their heads have 64-dimensional attention heads, which
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


PRM_SEPARATOR = "<extra_0>"  # the step separator token of the Qwen2.5-Math-PRM family


def make_tiny_prm(target: Path, tokenizer_dir: Path, *, seed: int = 0) -> Path:
    """Save a randomly initialised process reward model to ``target``: vLLM's
    ``Qwen2ForProcessRewardModel`` (Qwen2.5-Math-PRM's architecture: the Qwen2 body, then a
    hidden -> hidden -> ReLU -> 2 head on every token), hidden 128, 2 layers, with the SmolLM2
    tokenizer and its step separator ``<extra_0>`` added as a special token. transformers has no
    class for it (the hub's models ship their own code), so the weights are the body's and the head's
    tensors under the names vLLM loads (``model.*``, ``score.0.*``, ``score.2.*``)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, Qwen2Config, Qwen2Model

    if (target / "config.json").exists():
        return target
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": [PRM_SEPARATOR]})
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        num_labels=2,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        architectures=["Qwen2ForProcessRewardModel"],
    )
    body = Qwen2Model(config)
    tensors = {f"model.{k}": v.contiguous() for k, v in body.state_dict().items()}
    hidden = config.hidden_size
    tensors["score.0.weight"] = torch.randn(hidden, hidden) * 0.2
    tensors["score.0.bias"] = torch.randn(hidden) * 0.1
    tensors["score.2.weight"] = torch.randn(2, hidden) * 0.3  # unit-scale logits: probabilities spread
    tensors["score.2.bias"] = torch.zeros(2)
    target.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def prm_reference(model_dir: Path, token_ids: list[int]) -> list[list[float]]:
    """The tiny PRM's per-token label probabilities computed with transformers' Qwen2 body and the
    head by hand, in float32: what a served PRM must give."""
    import torch
    from safetensors.torch import load_file
    from transformers import Qwen2Config, Qwen2Model

    config = Qwen2Config.from_pretrained(model_dir)
    tensors = load_file(str(model_dir / "model.safetensors"))
    body = Qwen2Model(config)
    body.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")})
    body.eval()
    with torch.no_grad():
        hidden = body(torch.tensor([token_ids])).last_hidden_state[0]
        h = torch.relu(hidden @ tensors["score.0.weight"].T + tensors["score.0.bias"])
        logits = h @ tensors["score.2.weight"].T + tensors["score.2.bias"]
        return torch.softmax(logits, dim=-1).tolist()


# The attribute heads of multi-objective reward models (HelpSteer2's, which ArmoRM regresses too).
OBJECTIVES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")


def make_tiny_multi_classifier(
    target: Path,
    tokenizer_dir: Path,
    *,
    objectives: tuple[str, ...] | list[str] = OBJECTIVES,
    seed: int = 0,
    layers: int = 2,
) -> Path:
    """A multi-objective reward model: ``make_tiny_classifier``'s architecture (Qwen2, hidden 128, 2
    heads of 64, the SmolLM2 tokenizer and chat template) with one output per objective, named in
    ``config.json``'s ``id2label`` in order.

    Seeded random weights, so the same arguments make the same model. The score head's rows are
    independent unit-scale directions: each objective weighs the final hidden state differently,
    so objectives differ from each other and between texts by about one logit."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForSequenceClassification

    if len(objectives) < 2 or len(set(objectives)) != len(objectives):
        raise ValueError(f"a multi-objective model needs two or more distinct objectives, got {objectives}")
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
        num_labels=len(objectives),
        id2label=dict(enumerate(objectives)),
        label2id={name: i for i, name in enumerate(objectives)},
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = Qwen2ForSequenceClassification(config)
    with torch.no_grad():
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


def make_tiny_vlm(target: Path, tokenizer_dir: Path, *, seed: int = 0) -> Path:
    """A randomly initialised vision-language judge vLLM serves with image inputs.

    The architecture is Idefics3 (SmolVLM's: a SigLIP-style vision tower, pixel shuffle, a Llama text
    model) with the SmolLM2 tokenizer and its chat template. Qwen2-VL, the family of UnifiedReward,
    needs torchvision for its image and video processors, which has no build for this CPU torch;
    Idefics3's processor runs on PIL alone. Images are 128x128 (16 patches of 16, 16 image tokens).

    An untrained model spreads its next-token probability over the whole vocabulary, so no verdict
    label would reach the top log-probabilities. The output rows of the verdict and rating labels are
    therefore aligned with the final hidden state the chat template's generation prompt leads to:
    the labels take most of the probability, and which label wins still depends on the input (text
    and pixels) through a random component of each row.
    """
    import torch
    from transformers import (
        AutoTokenizer,
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3Processor,
    )
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    if (target / "config.json").exists():
        return target
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    extra = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]
    extra += [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    tokenizer.add_special_tokens({"additional_special_tokens": extra})
    torch.manual_seed(seed)
    text = dict(
        model_type="llama",
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = Idefics3Config(
        vision_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=1,
            image_size=128,
            patch_size=16,
        ),
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=2,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = Idefics3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        # Pixels must matter: a larger connector projection than the default initialisation.
        model.model.connector.modality_projection.proj.weight.normal_(0.0, 0.2)
        messages = [{"role": "user", "content": "Which is better? Answer A or B."}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        hidden = model.model.text_model(input_ids=ids).last_hidden_state[0, -1]
        direction = hidden / hidden.norm()
        head = model.lm_head.weight
        labels = ["A", "B", " A", " B", *[str(v) for v in range(1, 10)], *[f" {v}" for v in range(1, 10)]]
        for label in labels:
            ids = tokenizer(label, add_special_tokens=False).input_ids
            if len(ids) != 1:  # not a token of its own: the judge reads the other spelling
                continue
            # a shared logit of about 12 on the reference input, and input-dependent differences
            # between the labels of about one (the final hidden state's norm is about sqrt(128))
            shared = 13.0 if label.strip() in "AB" else 11.5  # verdict labels above rating labels
            head[ids[0]] = shared * direction / hidden.norm() + torch.randn(head.shape[1]) * 0.08
    model.save_pretrained(target)
    images = Idefics3ImageProcessorPil(
        size={"longest_edge": 128}, max_image_size={"longest_edge": 128}, do_image_splitting=False
    )
    Idefics3Processor(
        image_processor=images, tokenizer=tokenizer, image_seq_len=16, chat_template=tokenizer.chat_template
    ).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def _caption_tokenizer(corpus: Path):
    """A small byte-level BPE tokenizer (1024 tokens) trained on a text corpus, with CLIP's start and
    end tokens appended (not at id 0, which vLLM's CLIP processor uses as its image placeholder)."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    texts = [json.loads(line)["prompt"] for line in corpus.read_text().splitlines() if line.strip()]
    trainer = trainers.BpeTrainer(
        vocab_size=1024, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tk.train_from_iterator(texts, trainer)
    tk.add_special_tokens(["<|startoftext|>", "<|endoftext|>"])
    bos, eos = tk.token_to_id("<|startoftext|>"), tk.token_to_id("<|endoftext|>")
    tk.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", bos), ("<|endoftext|>", eos)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=77,
    )


def make_tiny_clip(target: Path, corpus: Path, *, seed: int = 0) -> Path:
    """A randomly initialised CLIP dual encoder (``CLIPModel``: the PickScore / HPS architecture) with
    64-dimensional towers and projections, 32x32 images in 8x8 patches, and a BPE tokenizer trained
    on ``corpus`` (a JSONL file with a ``prompt`` field)."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    if (target / "config.json").exists():
        return target
    tokenizer = _caption_tokenizer(corpus)
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=1,
            max_position_embeddings=77,
            projection_dim=64,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ),
        vision_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=1,
            image_size=32,
            patch_size=8,
            projection_dim=64,
        ),
        projection_dim=64,
    )
    CLIPModel(config).save_pretrained(target)
    images = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def main(argv: list[str] | None = None) -> None:
    """``python -m tests.model_factory vlm|clip|classifier|objectives DIR``: make a tiny random model
    for a smoke test on a machine without a model hub (the models the tests serve); ``objectives`` is
    the multi-objective reward model (one output per objective, named in ``id2label``)."""
    import sys

    from referee.embedded import ensure_embedded

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] not in ("vlm", "clip", "classifier", "objectives"):
        raise SystemExit("usage: python -m tests.model_factory vlm|clip|classifier|objectives DIR")
    kind, target = args[0], Path(args[1])
    if kind == "clip":
        corpus = Path(__file__).parent / "data" / "hh_harmless_subset.jsonl"
        print(make_tiny_clip(target, corpus))
    elif kind == "vlm":
        print(make_tiny_vlm(target, ensure_embedded("smollm2")))
    elif kind == "objectives":
        print(make_tiny_multi_classifier(target, ensure_embedded("smollm2")))
    else:
        print(make_tiny_classifier(target, ensure_embedded("smollm2")))


if __name__ == "__main__":
    main()
