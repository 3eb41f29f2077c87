"""The one module that imports vLLM.

``Engine`` wraps one ``AsyncLLM`` per loaded model. Every call is a single engine request that the
caller awaits; many are kept in flight at once and vLLM's continuous batching batches them, so
nothing here serialises requests (no lock, no loop of our own in front of the engine).
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from typing import Literal

from transformers import AutoTokenizer

from referee.embedded import resolve_model

from .settings import EngineSettings

logger = logging.getLogger(__name__)

GiB = 1 << 30


@dataclass
class Completion:
    """One generation: its text and the first generated token's top log-probabilities by token id."""

    text: str
    first_token_logprobs: dict[int, float] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None


async def _last(stream):
    """The final output of an engine request (outputs are requested as FINAL_ONLY anyway)."""
    final = None
    async for out in stream:
        final = out
    if final is None:
        raise RuntimeError("the engine returned no output")
    return final


class Engine:
    """An async vLLM engine for one model, with the model's own tokenizer for prompt building."""

    def __init__(self, llm, tokenizer, model_path: str, runner: str) -> None:
        self._llm = llm
        self._priorities = llm.vllm_config.scheduler_config.policy == "priority"
        self.tokenizer = tokenizer
        self.model_path = model_path
        self.runner = runner
        self.max_model_len: int = llm.model_config.max_model_len

    @classmethod
    def start(cls, model: str, settings: EngineSettings, runner: Literal["generate", "pooling"]) -> Engine:
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        path = resolve_model(model)
        prefix_caching = settings.enable_prefix_caching
        if prefix_caching is None:
            # Generative judges see the same system prompt and question many times (every pair of
            # a win-rate group shares it), which prefix caching turns into one prefill.
            prefix_caching = runner == "generate"
        kwargs = dict(
            model=path,
            runner=runner,
            dtype=settings.dtype,
            max_model_len=settings.max_model_len,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            tensor_parallel_size=settings.tensor_parallel_size,
            enforce_eager=settings.enforce_eager,
            enable_prefix_caching=prefix_caching,
            seed=settings.seed,
            scheduling_policy=settings.scheduling_policy,
        )
        if settings.kv_cache_memory_gib is not None:
            kwargs["kv_cache_memory_bytes"] = int(settings.kv_cache_memory_gib * GiB)
        if settings.max_num_seqs is not None:
            kwargs["max_num_seqs"] = settings.max_num_seqs
        kwargs.update(settings.extra)
        logger.info("starting vLLM engine for %s (%s)", path, runner)
        llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
        tokenizer = AutoTokenizer.from_pretrained(path)
        return cls(llm, tokenizer, path, runner)

    def chat_ids(self, messages: list[dict], *, generation_prompt: bool) -> list[int]:
        """Token ids of a conversation in the model's chat template (special tokens as the template
        writes them, none added twice)."""
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def text_ids(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids

    def single_token_id(self, label: str) -> int | None:
        ids = self.tokenizer.encode(label, add_special_tokens=False)
        return ids[0] if len(ids) == 1 else None

    async def complete(
        self,
        token_ids: list[int],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        top_logprobs: int | None = None,
        seed: int | None = None,
        priority: int = 0,
    ) -> Completion:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(
            max_tokens=max_tokens, temperature=temperature, logprobs=top_logprobs, seed=seed
        )
        final = await _last(
            self._llm.generate(
                TokensPrompt(prompt_token_ids=token_ids),
                params,
                request_id=uuid.uuid4().hex,
                priority=priority if self._priorities else 0,
            )
        )
        choice = final.outputs[0]
        first: dict[int, float] = {}
        if top_logprobs and choice.logprobs:
            first = {tid: lp.logprob for tid, lp in choice.logprobs[0].items()}
        return Completion(
            text=choice.text,
            first_token_logprobs=first,
            prompt_tokens=len(final.prompt_token_ids or token_ids),
            completion_tokens=len(choice.token_ids),
            finish_reason=choice.finish_reason,
        )

    async def classify(self, token_ids: list[int], *, activation: bool = False, priority: int = 0) -> float:
        """The classifier's single output. ``activation=False`` returns the raw logit: vLLM applies
        a sigmoid to one-label classifiers by default, which is not what a reward model's score is."""
        from vllm import PoolingParams
        from vllm.inputs import TokensPrompt

        params = PoolingParams(task="classify", use_activation=activation)
        final = await _last(
            self._llm.encode(
                TokensPrompt(prompt_token_ids=token_ids),
                params,
                request_id=uuid.uuid4().hex,
                priority=priority if self._priorities else 0,
            )
        )
        data = final.outputs.data
        if data.numel() != 1:
            raise ValueError(f"the classifier returned {data.numel()} outputs; a reward model has one label")
        return float(data.reshape(-1)[0])

    def shutdown(self) -> None:
        self._llm.shutdown()
