"""The one module that imports vLLM.

``Engine`` wraps one ``AsyncLLM`` per loaded model. Every call is a single engine request that the
caller awaits; many are kept in flight at once and vLLM's continuous batching batches them, so
nothing here serialises requests (no lock, no loop of our own in front of the engine).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import queue
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from typing import Literal, TypeVar

from transformers import AutoTokenizer

from referee.embedded import resolve_model

from .engine_types import Completion, EngineDead
from .hardware import (
    EngineDefaults,
    cpu_info,
    device_type,
    engine_defaults,
    engine_environment,
    resolve_dtype,
)
from .judge_settings import EngineSettings
from .tokens import PromptTokenizer

logger = logging.getLogger(__name__)

GiB = 1 << 30
T = TypeVar("T")


class PriorityWorker:
    """One thread that runs submitted callables lowest priority first, in submission order among
    equal priorities. (The standard library's executors are first come first served, and with one
    FIFO thread a small request waits for every prompt of a large one queued before it.)"""

    def __init__(self, name: str) -> None:
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._seq = itertools.count()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def submit(self, priority: float, fn: Callable[[], T]) -> Future:
        future: Future = Future()
        if self._closed:
            future.cancel()
        else:
            self._queue.put((priority, next(self._seq), fn, future))
        return future

    def _work(self) -> None:
        while True:
            _, _, fn, future = self._queue.get()
            if fn is None:
                return
            if not future.set_running_or_notify_cancel():
                continue  # its request was cancelled while it waited
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to the awaiting request
                future.set_exception(exc)

    def shutdown(self) -> None:
        """Cancel what waits and stop the thread after the callable in progress."""
        self._closed = True
        while True:
            try:
                _, _, _, future = self._queue.get_nowait()
            except queue.Empty:
                break
            if future is not None:
                future.cancel()
        self._queue.put((-math.inf, -1, None, None))


def _prompt(token_ids: list[int], cache_salt: str | None, images: list | None = None):
    """vLLM's token prompt; with a salt its prefix-cache blocks are shared only with prompts of the
    same salt (one tenant's), so another tenant cannot time its way to them. ``images`` fill the
    prompt's image placeholders in order (vLLM's multimodal processor expands each into the
    model's image tokens, and caches processed images by content)."""
    from vllm.inputs import TokensPrompt

    prompt = TokensPrompt(prompt_token_ids=token_ids)
    if cache_salt is not None:
        prompt["cache_salt"] = cache_salt
    if images:
        prompt["multi_modal_data"] = {"image": list(images)}
    return prompt


def _image_placeholder(llm) -> Callable[[int], str] | None:
    """The text vLLM's implementation of a multimodal model expects where the n-th image of a
    prompt goes (``<image>``, Qwen2-VL's ``<|vision_start|><|image_pad|><|vision_end|>``, ...);
    None for a model that sees text only."""
    config = llm.model_config
    if not config.is_multimodal_model:
        return None
    from vllm.model_executor.models.registry import ModelRegistry

    cls, _ = ModelRegistry.resolve_model_cls(config.architectures, config)
    if cls.get_placeholder_str("image", 1) is None:
        return None
    return lambda n: cls.get_placeholder_str("image", n)


async def _last(stream):
    """The final output of an engine request (outputs are requested as FINAL_ONLY anyway)."""
    from vllm.v1.engine.exceptions import EngineDeadError

    final = None
    try:
        async for out in stream:
            final = out
    except EngineDeadError as exc:
        raise EngineDead(f"the vLLM engine died: {exc}") from exc
    if final is None:
        raise RuntimeError("the engine returned no output")
    return final


def _output_labels(config) -> list[str] | None:
    """A classifier config's output names in output order (``id2label``), or None when it has none
    worth showing: no ``id2label``, or only transformers' defaults (``LABEL_0``, ``LABEL_1``, ...)."""
    id2label = getattr(config, "id2label", None) or {}
    count = getattr(config, "num_labels", None) or len(id2label)
    by_index = {int(k): str(v) for k, v in id2label.items()}
    labels = [by_index.get(i) for i in range(count)]
    if not labels or None in labels or labels == [f"LABEL_{i}" for i in range(count)]:
        return None
    return labels


def model_fingerprint(path: str) -> str:
    """A short hash of a model folder's config and weight files (names, sizes, modification times):
    cached judgments of a model are not served for another model saved at the same path."""
    import hashlib
    from pathlib import Path

    folder = Path(path)
    if not folder.is_dir():  # a hub id: its revision is what the hub resolved; the id stands for it
        return hashlib.sha256(path.encode()).hexdigest()[:16]
    digest = hashlib.sha256()
    for file in sorted(folder.iterdir()):
        if file.is_file() and file.suffix in (".json", ".safetensors", ".bin", ".model", ".jinja"):
            stat = file.stat()
            digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
            if file.name == "config.json":
                digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def engine_args(
    path: str,
    settings: EngineSettings,
    runner: str,
    device: str,
    dtype: str,
    *,
    engines_on_device: int = 1,
    devices: list[int] | None = None,
) -> tuple[dict, EngineDefaults]:
    """vLLM's ``AsyncEngineArgs`` for one engine, and the platform defaults it got (with why).

    Settings left unset get the platform's defaults (``hardware.engine_defaults``); ``devices``
    (or the engine's own ``gpus``) become vLLM's ``device_ids``, indices into the visible GPUs."""
    chosen = engine_defaults(
        device,
        runner,
        enforce_eager=settings.enforce_eager,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        engines_on_device=engines_on_device,
    )
    prefix_caching = settings.enable_prefix_caching
    if prefix_caching is None:
        # Generative judges see the same system prompt and question many times (every pair of
        # a win-rate group shares it), which prefix caching turns into one prefill.
        prefix_caching = runner == "generate"
    kwargs: dict = dict(
        model=path,
        runner=runner,
        dtype=dtype,
        max_model_len=settings.max_model_len,
        gpu_memory_utilization=chosen.gpu_memory_utilization,
        tensor_parallel_size=settings.tensor_parallel_size,
        enforce_eager=chosen.enforce_eager,
        enable_prefix_caching=prefix_caching,
        seed=settings.seed,
        scheduling_policy=settings.scheduling_policy,
    )
    if settings.kv_cache_memory_gib is not None:
        kwargs["kv_cache_memory_bytes"] = int(settings.kv_cache_memory_gib * GiB)
    if settings.max_num_seqs is not None:
        kwargs["max_num_seqs"] = settings.max_num_seqs
    if chosen.max_num_batched_tokens is not None:
        kwargs["max_num_batched_tokens"] = chosen.max_num_batched_tokens
    gpus = settings.gpus if settings.gpus is not None else devices
    if gpus is not None and device != "cpu":
        kwargs["device_ids"] = list(gpus)
    kwargs.update(settings.extra)
    return kwargs, chosen


class Engine:
    """An async vLLM engine for one model, with the model's own tokenizer for prompt building."""

    image_placeholder: Callable[[int], str] | None = None  # set for vision-language models
    media: tuple[str, ...] | list[str] = ()
    fingerprint: str = ""  # the model's files, as the judgment cache keys them

    def __init__(self, llm, tokenizer, model_path: str, runner: str, dtype_reason: str = "") -> None:
        self._llm = llm
        self._priorities = llm.vllm_config.scheduler_config.policy == "priority"
        self._cpu = device_type() == "cpu"
        self.tokenizer = tokenizer
        self.model_path = model_path
        self.runner = runner
        self.max_model_len: int = llm.model_config.max_model_len
        self.dtype: str = str(llm.model_config.dtype).removeprefix("torch.")
        self.dtype_reason = dtype_reason
        self.choices: dict[str, str] = {}  # platform-dependent settings: what it got and why
        self.image_placeholder = _image_placeholder(llm) if runner == "generate" else None
        self.media: list[str] = ["image"] if self.image_placeholder else []

    @classmethod
    def start(
        cls,
        model: str,
        settings: EngineSettings,
        runner: Literal["generate", "pooling"],
        cpu_bind: str | None = None,
        *,
        engines_on_device: int = 1,
        devices: list[int] | None = None,
    ) -> Engine:
        """Start an engine; ``cpu_bind`` is the CPU build's ``VLLM_CPU_OMP_THREADS_BIND`` for it
        (None: vLLM's own choice); ``devices`` the GPUs it is placed on and ``engines_on_device``
        how many engines share them (``memory_plan.place_engines``; ``engine.gpus`` wins)."""
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        path = resolve_model(model)
        device = device_type()
        dtype, why = resolve_dtype(settings.dtype)
        kwargs, chosen = engine_args(
            path, settings, runner, device, dtype, engines_on_device=engines_on_device, devices=devices
        )
        placed = f"; GPUs {kwargs['device_ids']}" if "device_ids" in kwargs else ""
        if device == "cpu":
            bind = os.environ.get("VLLM_CPU_OMP_THREADS_BIND") or cpu_bind or "auto (vLLM's default)"
            logger.info(
                "starting vLLM engine for %s (%s) on the CPU: %s; dtype %s (%s); worker cores %s; %s",
                path, runner, cpu_info().describe(), dtype, why, bind, chosen.describe(),
            )  # fmt: skip
        else:
            logger.info(
                "starting vLLM engine for %s (%s) on %s%s; dtype %s (%s); %s",
                path, runner, device, placed, dtype, why, chosen.describe(),
            )  # fmt: skip
        with engine_environment(cpu_bind if device == "cpu" else None, chosen.environment):
            llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
        tokenizer = AutoTokenizer.from_pretrained(path)
        engine = cls(llm, tokenizer, path, runner, why)
        engine.fingerprint = model_fingerprint(path)
        engine.choices = dict(chosen.reasons)
        return engine

    @property
    def prompts(self) -> PromptTokenizer:
        """The tokenizer wrapped so that user text never becomes control tokens (see ``tokens``)."""
        built = self.__dict__.get("_prompts")
        if built is None or built.tokenizer is not self.tokenizer:
            built = self._prompts = PromptTokenizer(self.tokenizer)
        return built

    async def tokenize(self, build: Callable[[], T], priority: float = 0.0) -> T:
        """Run ``build`` (chat templating and tokenisation) off the event loop, so that a request
        with many long texts never stalls the API process (health probes, other requests). One
        thread per engine (a tokenizer is not shared between threads), taking the lowest
        ``priority`` first: requests pass their fair-share tags, so a one-item request of another
        job waits for the prompt in progress, not for a large request's thousands of prompts.
        A cancelled request's queued prompts are dropped before they start."""
        worker = self.__dict__.get("_tokenizing")
        if worker is None:
            worker = self._tokenizing = PriorityWorker(f"tokenize-{self.runner}")
        return await asyncio.wrap_future(worker.submit(priority, build))

    def chat_ids(
        self, messages: list[dict], *, generation_prompt: bool, images: list | None = None
    ) -> list[int]:
        """Token ids of a conversation in the model's chat template: the template's special tokens
        as it writes them, every message content as ordinary tokens (user data, never control).
        Images the messages carry are appended to ``images`` in prompt order."""
        return self.prompts.chat_ids(
            messages, generation_prompt=generation_prompt, placeholder=self.image_placeholder, images=images
        )

    def text_ids(self, text: str, add_special_tokens: bool = True, *, data: str = "") -> list[int]:
        """Text the client already formatted for the model (special tokens parsed, the tokenizer's
        BOS once whatever the text starts with), then optional user ``data`` as ordinary tokens."""
        return self.prompts.formatted_ids(text, add_special_tokens=add_special_tokens, data=data)

    def plain_ids(self, texts: list[str]) -> list[int]:
        """User texts for a model without a chat template: ordinary tokens, BOS/EOS added once."""
        return self.prompts.plain_ids(texts)

    def single_token_id(self, label: str) -> int | None:
        ids = self.prompts.data_ids(label)
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
        cache_salt: str | None = None,
        images: list | None = None,
    ) -> Completion:
        from vllm import SamplingParams

        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            logprobs=top_logprobs,
            seed=self._device_seed(seed, temperature),
        )
        final = await _last(
            self._llm.generate(
                _prompt(token_ids, cache_salt, images),
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

    _cpu = False  # the CPU build of vLLM (set at start)

    def _device_seed(self, seed: int | None, temperature: float | None) -> int | None:
        """The per-request seed vLLM may be given. On the CPU build a seeded *sampled* request kills
        the engine core as soon as its prompt is prefilled over more than one engine step (which
        chunked prefill does to any prompt longer than the step budget, and to shorter ones under
        load): vLLM rewinds the request's generator for the token it discards after a partial
        prefill, and a CPU ``torch.Generator`` has no offset to rewind ("CPU Generator does not use
        offset"). One tenant's seed would stop every tenant's judging, so on the CPU sampled
        requests run unseeded (reproducible only on a GPU, where the seed is passed); greedy
        requests need no seed."""
        if seed is None or not self._cpu or not temperature:
            return seed
        if not Engine._seed_warned:
            Engine._seed_warned = True
            logger.warning(
                "seeded sampling is not reproducible on the CPU build of vLLM: the seed is not passed "
                "to the engine (a seeded request prefilled over several steps kills its CPU engine core)"
            )
        return None

    _seed_warned = False

    async def classify(
        self,
        token_ids: list[int],
        *,
        activation: bool = False,
        priority: int = 0,
        cache_salt: str | None = None,
    ) -> float:
        """The classifier's single output. ``activation=False`` returns the raw logit: vLLM applies
        a sigmoid to one-label classifiers by default, which is not what a reward model's score is."""
        data = await self._classify_outputs(token_ids, activation, priority, cache_salt)
        if data.numel() != 1:
            raise ValueError(f"the classifier returned {data.numel()} outputs; a reward model has one label")
        return float(data.reshape(-1)[0])

    async def classify_all(
        self, token_ids: list[int], *, priority: int = 0, cache_salt: str | None = None
    ) -> list[float]:
        """Every output of a sequence classifier (a multi-objective reward model's objectives), as
        raw logits in the model's label order (``output_labels``). No activation: vLLM's default
        for a classifier with several labels is a softmax across them (a sigmoid for one label),
        which would turn independent objective scores into shares of one distribution."""
        data = await self._classify_outputs(token_ids, False, priority, cache_salt)
        return [float(x) for x in data.reshape(-1)]

    async def _classify_outputs(
        self, token_ids: list[int], activation: bool, priority: int, cache_salt: str | None
    ):
        from vllm import PoolingParams

        params = PoolingParams(task="classify", use_activation=activation)
        final = await _last(
            self._llm.encode(
                _prompt(token_ids, cache_salt),
                params,
                request_id=uuid.uuid4().hex,
                priority=priority if self._priorities else 0,
            )
        )
        return final.outputs.data

    async def step_probs(
        self, token_ids: list[int], step_tag_id: int, *, priority: int = 0, cache_salt: str | None = None
    ) -> list[list[float]]:
        """A process reward model's label probabilities at each occurrence of ``step_tag_id`` in
        the prompt, in order (vLLM's step pooling: the model's own separator id is set per request,
        whatever its config names)."""
        from vllm import PoolingParams

        params = PoolingParams(task="token_classify", use_activation=True, step_tag_id=step_tag_id)
        final = await _last(
            self._llm.encode(
                _prompt(token_ids, cache_salt),
                params,
                request_id=uuid.uuid4().hex,
                priority=priority if self._priorities else 0,
            )
        )
        data = final.outputs.data
        rows = sum(1 for t in token_ids if t == step_tag_id)
        return [[float(x) for x in row] for row in data.reshape(rows, -1)]

    @property
    def output_labels(self) -> list[str] | None:
        """A pooling model's output names in ``classify_all``'s order, from its config's
        ``id2label``; None for a generative engine and for a config without meaningful names
        (transformers' ``LABEL_0``, ``LABEL_1``, ... defaults, as a one-label reward model has)."""
        llm = self.__dict__.get("_llm")
        if self.runner != "pooling" or llm is None:
            return None
        return _output_labels(llm.model_config.hf_config)

    async def prompt_logprobs(
        self, token_ids: list[int], *, start: int, priority: int = 0, cache_salt: str | None = None
    ) -> tuple[float, int]:
        """``(sum, count)``: the sum of the log-probabilities the model gives the prompt tokens
        ``token_ids[start:]``, each given the tokens before it, and how many tokens were summed
        (the follow-up likelihood of an utterance appended after a conversation, for example).

        ``start`` must leave at least one token before and one after it (the first token has no
        log-probability). Prompt log-probabilities are computed during prefill, so a request that
        reads its prefix from the prefix cache would have none for the cached tokens; vLLM skips
        reading the cache for requests that ask for them (``skip_reading_prefix_cache``, set here
        explicitly too) and still writes their blocks for other requests."""
        from vllm import SamplingParams

        if self.runner != "generate":
            raise ValueError("prompt log-probabilities need a generative (runner='generate') engine")
        if not 1 <= start < len(token_ids):
            raise ValueError(
                f"start={start} is out of range for {len(token_ids)} prompt tokens: it must be at least "
                "1 (the first token has no log-probability) and leave at least one token to score"
            )
        params = SamplingParams(
            max_tokens=1, temperature=0.0, prompt_logprobs=0, skip_reading_prefix_cache=True
        )
        final = await _last(
            self._llm.generate(
                _prompt(token_ids, cache_salt),
                params,
                request_id=uuid.uuid4().hex,
                priority=priority if self._priorities else 0,
            )
        )
        returned = final.prompt_logprobs
        if returned is None or len(returned) != len(token_ids):
            got = "no prompt log-probabilities" if returned is None else f"{len(returned)} positions"
            raise ValueError(f"the engine returned {got} for a prompt of {len(token_ids)} tokens")
        total = 0.0
        for pos in range(start, len(token_ids)):
            entry = returned[pos]
            logprob = entry.get(token_ids[pos]) if entry else None
            if logprob is None or math.isnan(logprob.logprob):
                raise ValueError(f"the engine returned no log-probability for prompt token {pos}")
            total += logprob.logprob
        return total, len(token_ids) - start

    async def generate_stream(
        self,
        token_ids: list[int],
        params: dict,
        *,
        images: list | None = None,
        delta: bool = False,
        priority: int = 0,
        cache_salt: str | None = None,
    ):
        """The engine's outputs for free-form sampling (``params``: vLLM ``SamplingParams`` fields):
        each step's new text (``delta``) or the final output only."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.exceptions import EngineDeadError

        kind = RequestOutputKind.DELTA if delta else RequestOutputKind.FINAL_ONLY
        params = {**params, "seed": self._device_seed(params.get("seed"), params.get("temperature", 1.0))}
        sampling = SamplingParams(**params, output_kind=kind)
        try:
            async for out in self._llm.generate(
                _prompt(token_ids, cache_salt, images),
                sampling,
                request_id=uuid.uuid4().hex,
                priority=priority if self._priorities else 0,
            ):
                yield out
        except EngineDeadError as exc:
            raise EngineDead(f"the vLLM engine died: {exc}") from exc

    async def embed(
        self,
        token_ids: list[int],
        *,
        images: list | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
    ) -> list[float]:
        """An embedding model's vector for a text (token ids) or an image (no ids, one image)."""
        from vllm import PoolingParams

        final = await _last(
            self._llm.encode(
                _prompt(token_ids, cache_salt, images),
                PoolingParams(task="embed"),
                request_id=uuid.uuid4().hex,
                priority=priority if self._priorities else 0,
            )
        )
        return [float(x) for x in final.outputs.data.reshape(-1)]

    @property
    def dead(self) -> bool:
        """True once the engine core has died (vLLM's own health flag)."""
        return bool(self._llm.errored)

    def shutdown(self) -> None:
        if (worker := self.__dict__.get("_tokenizing")) is not None:
            worker.shutdown()
        self._llm.shutdown()
