"""The wire protocol: request and response models shared by the server, the SDK and the queue.

Every route takes a list of items (batching at the edge) and may name a judge; without one the
server's default judge answers. Results come back in the order of the items, each with its own
``error`` so that one failing item never hides behind a neutral value.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

SCHEMA_VERSION = 1

Role = Literal["system", "user", "assistant"]
PairwiseMode = Literal["logprob", "cot"]
Order = Literal["single", "random", "both"]
Verdict = Literal["A", "B", "tie", "invalid"]
InconsistentRule = Literal["tie", "average", "drop"]
JudgeKind = Literal["classifier", "generative", "clip", "ensemble", "followup", "prm"]
Transform = Literal["none", "par", "log_sigmoid"]


class _Model(BaseModel):
    # Unknown fields are an error rather than silently ignored: a typo in an option must not
    # quietly fall back to a default the caller did not want.
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------- media


class _Part(_Model):
    def model_post_init(self, context: Any, /) -> None:
        # The discriminator is always sent, also by clients that send only the fields they set.
        self.__pydantic_fields_set__.add("type")


class TextPart(_Part):
    type: Literal["text"] = "text"
    text: str


class ImagePart(_Part):
    """An image: inline (``data``, base64 of a PNG, JPEG or WebP file) or uploaded before (``blob``,
    the id ``POST /blobs`` or ``QueueReferee.upload`` returned). Nothing is fetched from URLs."""

    type: Literal["image"] = "image"
    data: str | None = Field(None, description="Base64 of the image file (PNG, JPEG or WebP).")
    blob: str | None = Field(
        None, pattern=r"^sha256:[0-9a-f]{64}$", description="An uploaded image's id, sha256:<hex>."
    )
    _image: Any = PrivateAttr(None)  # the decoded image, once the server has resolved it

    @model_validator(mode="after")
    def _one_source(self) -> ImagePart:
        if (self.data is None) == (self.blob is None):
            raise ValueError("an image part takes exactly one of `data` (base64) or `blob` (an uploaded id)")
        return self


class ImageURL(_Model):
    url: str = Field(description="A data: URL (data:image/png;base64,...). Remote URLs are not fetched.")
    detail: str | None = None


class ImageURLPart(_Part):
    """The OpenAI chat shape of an image; only ``data:`` URLs are accepted."""

    type: Literal["image_url"] = "image_url"
    image_url: ImageURL
    _image: Any = PrivateAttr(None)


Part = Annotated[TextPart | ImagePart | ImageURLPart, Field(discriminator="type")]
Content = Annotated[
    str | list[Part],
    Field(
        description="Text, or a list of parts: text ({type: text, text}) and images ({type: image, "
        "data: <base64>} or {type: image, blob: <id from POST /blobs>}, or OpenAI's {type: image_url, "
        "image_url: {url: data:...}}). Images need a judge whose model sees them (/judges: media)."
    ),
]


STEP_DELIMITER = "\n\n"


class Steps(_Model):
    """A response given as the list of its steps, for process reward models (kind ``prm``):
    ``{"steps": ["step 1", "step 2"]}`` wherever a response goes (``/score``'s ``response`` and
    ``reference``, ``/pairwise``'s ``response_a``/``response_b``, ``/winrate``'s ``responses``).
    The steps are taken as they are, never split again on the judge's ``step_delimiter`` (a step
    may hold that text; never the model's separator token), one score per step. Any other kind of
    judge refuses them (422): join the steps into text for those."""

    steps: list[str] = Field(
        description="The steps, in order: each a non-empty text, at most the judge's max_steps of them."
    )

    def text(self, delimiter: str = STEP_DELIMITER) -> str:
        """The steps as one text, joined with ``delimiter``: what ``step_spans`` index."""
        return delimiter.join(self.steps)


def content_text(content: str | list | Steps) -> str:
    """The text of a content value, its images left out (a ``Steps`` response: its steps joined
    with blank lines)."""
    if isinstance(content, str):
        return content
    if isinstance(content, Steps):
        return content.text()
    return "".join(p.text for p in content if isinstance(p, TextPart))


def image_parts(content: str | list | Steps) -> list:
    """The image parts of a content value, in order."""
    if isinstance(content, str | Steps):
        return []
    return [p for p in content if not isinstance(p, TextPart)]


class Message(_Model):
    role: Role
    content: Content


Prompt = Annotated[
    str | list[Message],
    Field(description="The user's question as text, or a conversation as chat messages."),
]

ResponseContent = Annotated[
    str | list[Part] | Steps,
    Field(
        description="Content (text, or a list of parts), or, for process reward models, the list of "
        'its steps: {"steps": ["step 1", "step 2"]}.'
    ),
]


Seed = Annotated[
    int | None,
    Field(None, ge=0, le=2**62, description="Seed for order=random and for sampled retries (0..2**62)."),
]


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    engine_requests: int = Field(0, description="Requests sent to the vLLM engine for this answer.")
    cached: int = Field(
        0,
        description="Engine requests answered by the judgment cache instead (identical earlier or "
        "concurrent requests of the same tenant), not counted in engine_requests or tokens.",
    )


class _JudgeOptions(_Model):
    judge: str | None = Field(None, description="Name of a loaded judge; the default judge if omitted.")
    rubric: str | None = Field(
        None, description="Criteria the generative judge's prompt includes (ignored by classifiers)."
    )
    cache: bool | None = Field(
        None,
        description="Reuse identical deterministic engine answers (the judgment cache); false judges "
        "everything afresh. Default: the server's cache.default (on unless configured).",
    )
    objective: str | None = Field(
        None,
        description="Multi-objective reward models: the reward is this one objective (a name listed "
        "in /judges) instead of the weighted combination.",
    )
    weights: dict[str, float] | None = Field(
        None,
        description="Multi-objective reward models: this request's weights of the named objectives "
        "(objectives not named weigh 0) instead of the judge's.",
    )


# ---------------------------------------------------------------- /score


class ScoreItem(_Model):
    prompt: Prompt
    response: ResponseContent
    reference: ResponseContent | None = Field(
        None,
        description="A reference response to the same prompt (the SFT policy's, a gold answer): "
        "judged in the same request, its raw reward is the r_ref of the request's `transform`.",
    )
    reference_score: float | None = Field(
        None, description="The prompt's reference reward r_ref itself, instead of a reference response."
    )

    @model_validator(mode="after")
    def _one_reference(self) -> ScoreItem:
        if self.reference is not None and self.reference_score is not None:
            raise ValueError("give `reference` (a response to judge) or `reference_score`, not both")
        return self


class ScoreRequest(_JudgeOptions):
    items: list[ScoreItem] = Field(min_length=1)
    aggregate: Literal["min", "last", "mean", "product"] | None = Field(
        None,
        description="Process reward models: the reward from the step scores (default: the judge's, min).",
    )
    transform: Transform | None = Field(
        None,
        description="Shape each raw reward r against its item's reference r_ref. par: sigmoid(r - "
        "r_ref), bounded in (0, 1) and flat where the policy already beats the reference (PAR, Fu et "
        "al. 2025, 'Reward Shaping to Mitigate Reward Hacking in RLHF'); log_sigmoid: log sigmoid(r - "
        "r_ref) <= 0, so that a sum of shaped rewards is high only when every term is (Wang et al. "
        "2024, 'Transforming and Combining Rewards for Aligning Large Language Models'); none: the "
        "raw reward. Default: the judge's `transform` (none unless configured).",
    )


class ScoreResult(BaseModel):
    index: int
    score: float | None = Field(
        None,
        description="Classifier: the raw reward logit. Generative: the expected rating under the "
        "judge's probabilities over the scale's labels.",
    )
    label_mass: float | None = Field(
        None,
        description="Generative judges: the next-token probability on the scale's labels. Below "
        "the judge's min_label_mass the score is None, with the reason in error.",
    )
    raw_score: float | None = Field(
        None, description="With a transform: the raw reward r before shaping (score is the shaped one)."
    )
    reference_score: float | None = Field(
        None, description="With a transform: the r_ref it was shaped against."
    )
    objectives: dict[str, float] | None = Field(
        None, description="Multi-objective reward models: every named objective's raw output."
    )
    members: dict[str, float | None] | None = Field(
        None, description="Ensembles: each member judge's raw reward for this item."
    )
    uncertainty: float | None = Field(
        None, description="Ensembles: the members' disagreement (standard deviation of their rewards)."
    )
    step_scores: list[float] | None = Field(
        None, description="Process reward models: each step's score (its positive label's probability)."
    )
    step_spans: list[list[int]] | None = Field(
        None,
        description="Process reward models: each step's [start, end) character span in the response "
        "(a response given as steps: in its steps joined with the judge's step_delimiter), to place a "
        "step's reward on the trainer's own tokens.",
    )
    error: str | None = None


class ScoreResponse(BaseModel):
    judge: str
    results: list[ScoreResult]
    usage: Usage


# ---------------------------------------------------------------- /pairwise


class PairwiseItem(_Model):
    prompt: Prompt
    response_a: ResponseContent
    response_b: ResponseContent


class _PairwiseOptions(_JudgeOptions):
    mode: PairwiseMode = Field(
        "logprob",
        description="logprob: one-token verdict, P(A) from the label probabilities. "
        "cot: the judge reasons, then writes a verdict that is parsed strictly.",
    )
    order: Order = Field(
        "both",
        description="single: A shown first. random: shuffled per item (answers are un-shuffled). "
        "both: judged in both orders, probabilities averaged, agreement reported.",
    )
    seed: Seed = None
    max_new_tokens: int | None = Field(None, ge=1, description="Reasoning budget for mode=cot.")
    max_retries: int = Field(0, ge=0, description="Retries of an unparsable cot verdict (bounded).")
    samples: int = Field(
        1,
        ge=1,
        description="mode=cot: sampled judgments per comparison (per order with order=both), the "
        "majority their verdict (a mean credit as p_a) and the split reported (votes, uncertainty); "
        "an unparsable sample is counted apart and never votes. At most the server's "
        "limits.max_samples; each sample costs a generation.",
    )
    inconsistent: InconsistentRule | None = Field(
        None,
        description="order=both: what a pair whose verdict changes with the order becomes. tie (the "
        "MT-Bench/JudgeLM rule): a tie, p_a 1/2; average: the two orders' averaged probability "
        "decides; drop: invalid. Default: the judge's setting (tie unless configured).",
    )


class PairwiseRequest(_PairwiseOptions):
    items: list[PairwiseItem] = Field(min_length=1)


class PairwiseResult(BaseModel):
    index: int
    p_a: float | None = Field(None, description="Probability that response A is better.")
    verdict: Verdict
    consistent: bool | None = Field(
        None, description="order=both: whether the two orders gave the same verdict."
    )
    inconsistent_rule: InconsistentRule | None = Field(
        None,
        description="order=both and consistent=false: the rule that decided verdict and p_a "
        "(the request's or the judge's `inconsistent`).",
    )
    label_mass: float | None = Field(
        None,
        description="mode=logprob with a generative judge: the next-token probability on the labels "
        "A and B (order=both: the smaller of the two orders'). Below the judge's min_label_mass "
        "the verdict is invalid.",
    )
    swapped: bool | None = Field(None, description="order=random: whether B was shown first.")
    rationales: list[str] | None = Field(None, description="mode=cot: the judge's reasoning per order.")
    votes: dict[str, int] | None = Field(
        None,
        description="samples > 1: the sampled verdicts from A's side (A, B, tie, invalid), both orders' "
        "together with order=both.",
    )
    uncertainty: float | None = Field(
        None,
        description="Ensembles: the members' disagreement on this pair (standard deviation of their "
        "P(A); order=both: the larger of the two orders').",
    )
    error: str | None = None


class PairwiseResponse(BaseModel):
    judge: str
    results: list[PairwiseResult]
    usage: Usage


# ---------------------------------------------------------------- /judge


class JudgeItem(_Model):
    prompt: Prompt
    response: Content | None = Field(None, description="One response: the judge rates it.")
    response_a: Content | None = Field(None, description="Two responses: the judge compares them.")
    response_b: Content | None = None

    @model_validator(mode="after")
    def _one_or_two(self) -> JudgeItem:
        single = self.response is not None
        pair = self.response_a is not None or self.response_b is not None
        if single == pair or (pair and (self.response_a is None or self.response_b is None)):
            raise ValueError("give either `response` (to rate it) or both `response_a` and `response_b`")
        return self


class JudgeRequest(_JudgeOptions):
    items: list[JudgeItem] = Field(min_length=1)
    max_new_tokens: int | None = Field(None, ge=1, description="Reasoning budget.")
    max_retries: int = Field(0, ge=0, description="Retries of an unparsable verdict (bounded).")
    samples: int = Field(
        1,
        ge=1,
        description="mode=cot: sampled judgments per item, the "
        "majority their verdict (a rating: their mean) and the split reported (votes, uncertainty); "
        "an unparsable sample is counted apart and never votes. At most the server's "
        "limits.max_samples; each sample costs a generation.",
    )
    seed: Seed = None


class JudgeResult(BaseModel):
    index: int
    kind: Literal["score", "verdict"]
    score: float | None = None
    verdict: Verdict | None = None
    rationale: str | None = None
    attempts: int = 1
    votes: dict[str, int] | None = Field(
        None, description="samples > 1: the sampled verdicts (A, B, tie, invalid) or ratings."
    )
    uncertainty: float | None = Field(
        None, description="samples > 1: the spread of the samples (std of their credits or ratings)."
    )
    error: str | None = None


class JudgeResponse(BaseModel):
    judge: str
    results: list[JudgeResult]
    usage: Usage


# ---------------------------------------------------------------- /winrate


class WinRateRequest(_PairwiseOptions):
    prompt: Prompt
    responses: list[ResponseContent] = Field(
        min_length=2,
        description="The group: N >= 2 responses (texts, images, or a process reward model's steps) "
        "to one prompt.",
    )
    opponents: int | None = Field(
        None,
        ge=1,
        description="Compare each response with k others (a balanced circulant schedule, N*k/2 "
        "comparisons) instead of all N-1. When N and k are both odd, exactly k for every response is "
        "impossible and one response gets k+1. Only for generative judges; classifiers always score "
        "N responses once.",
    )
    soft: bool = Field(
        False, description="Credit a comparison with P(i beats j) instead of its verdict (1, 1/2, 0)."
    )
    schedule: Literal["pairs", "listwise"] = Field(
        "pairs",
        description="pairs: compare pairs (every pair, or `opponents` per response). listwise: a "
        "generative judge sees the whole group at once, reasons and ranks it (one generation per "
        "listing; order=both adds the reversed listing); the ranking must be a permutation of the "
        "group, else every pair is invalid with the reason.",
    )
    estimate: Literal["observed", "bradley_terry"] = Field(
        "observed",
        description="observed: credit / valid comparisons (Pref-GRPO). bradley_terry: the expected win "
        "rate against every other response under a Bradley-Terry fit of the comparisons made, which "
        "estimates the full round robin from a sparse schedule (opponents=k).",
    )


class WinRateResponse(BaseModel):
    judge: str
    win_rates: list[float | None] = Field(
        description="Per response: credit / valid comparisons; a tie is 1/2 to each side. "
        "None when none of its comparisons gave a valid verdict."
    )
    advantages: list[float | None] = Field(description="Group z-scores of the win rates (GRPO).")
    win_matrix: list[list[float | None]] = Field(
        description="win_matrix[i][j]: credit i earned against j; None if not compared or invalid."
    )
    scores: list[float | None] | None = Field(
        None,
        description="Classifier judges: each response's score. estimate=bradley_terry: each response's "
        "fitted strength (log scale, mean 0).",
    )
    uncertainties: list[float | None] | None = Field(
        None,
        description="Pointwise ensembles: each response's disagreement between members (the standard "
        "deviation of their rewards).",
    )
    comparisons: int = Field(description="Pairs compared (each pair once, whatever the order option).")
    rankings: list[list[int] | None] | None = Field(
        None,
        description="schedule=listwise: each listing's ranking as response indices, best first "
        "(None where the judge gave no valid ranking).",
    )
    ties: int
    invalid: int = Field(description="Pairs without a valid verdict; left out of the win rates.")
    inconsistent: int = Field(
        0,
        description="order=both: pairs whose verdict changed with the order, each changed by "
        "inconsistent_rule (tie: counted in ties too; drop: counted in invalid too).",
    )
    inconsistent_rule: InconsistentRule | None = Field(
        None, description="order=both with a generative judge: the rule applied to inconsistent pairs."
    )
    low_label_mass: int = Field(
        0,
        description="Pairs made invalid because the judge's probability on the labels A and B was "
        "below its min_label_mass (counted in invalid too).",
    )
    errors: list[str] = Field(default_factory=list, description="Why comparisons were invalid.")
    usage: Usage


# ---------------------------------------------------------------- /judges, errors


class JudgeInfo(BaseModel):
    name: str
    kind: JudgeKind
    model: str
    default: bool
    routes: list[str]
    pairwise_modes: list[PairwiseMode]
    objectives: list[str] = Field(
        default_factory=list, description="Multi-objective reward models: the named objectives."
    )
    weights: dict[str, float] | None = Field(
        None, description="Multi-objective reward models: the default weights of the objectives."
    )
    members: list[str] = Field(default_factory=list, description="Ensembles: the member judges.")
    media: list[Literal["image"]] = Field(
        default_factory=list, description="What the judge's model sees besides text (empty: text only)."
    )
    dtype: str | None = Field(None, description="The dtype the engine runs in (None while loading).")
    engine: dict[str, str] | None = Field(
        None,
        description="The engine's platform-dependent settings (eager mode, memory fraction, step budget), "
        "each with what it got and why (None while loading, and for kinds without an engine).",
    )
    backends: list[dict] | None = Field(
        None,
        description="A remote judge's servers: url, state (up, or out after failures until a health "
        "check passes), calls in flight, answered and failed calls, last error.",
    )


class JudgesResponse(BaseModel):
    default: str
    judges: list[JudgeInfo]


class BlobInfo(BaseModel):
    id: str = Field(description="sha256:<hex> of the bytes: reference it as {type: image, blob: id}.")
    bytes: int
    media_type: str = Field(description="image/png, image/jpeg or image/webp, as decoded.")
    width: int
    height: int
    expires_in: float = Field(description="Seconds until the server forgets it (each upload renews it).")


class ErrorResponse(BaseModel):
    error: str = Field(description="A short code: bad_request, unknown_judge, too_large, overloaded, ...")
    message: str = Field(description="What went wrong and what to change.")


# ---------------------------------------------------------------- the Redis queue


MessageType = Literal["score", "pairwise", "judge", "winrate"]

REQUEST_MODELS: dict[str, type[BaseModel]] = {
    "score": ScoreRequest,
    "pairwise": PairwiseRequest,
    "judge": JudgeRequest,
    "winrate": WinRateRequest,
}
RESPONSE_MODELS: dict[str, type[BaseModel]] = {
    "score": ScoreResponse,
    "pairwise": PairwiseResponse,
    "judge": JudgeResponse,
    "winrate": WinRateResponse,
}


class QueueMessage(BaseModel):
    """A request travelling through Redis: the HTTP request body plus routing and identity."""

    type: MessageType
    schema_version: int = SCHEMA_VERSION
    job_id: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    request_id: str = Field(
        pattern=r"^[A-Za-z0-9_.-]{1,128}$",
        description="Idempotency key: one answer per id (and per tenant and job: it is part of the reply's "
        "key name, so it may not hold ':' or glob characters).",
    )
    sent_at: float = Field(description="Sender's wall clock (seconds), for queue latency.")
    deadline: float | None = Field(
        None,
        description="Sender's wall clock (epoch seconds) after which an answer is of no use: a consumer "
        "that reaches the message later answers it with status 504 and error `expired`, unjudged, and "
        "stops judging it when the deadline passes mid-way. QueueReferee sets it from its timeout.",
    )
    body: dict


class QueueReply(BaseModel):
    """The answer written for the waiting sender: a response body, or an error with its HTTP status."""

    request_id: str
    status: int = Field(description="The HTTP status the same request would have had.")
    body: dict | None = None
    error: ErrorResponse | None = None
    attempts: int = Field(1, description="Deliveries the message took.")
    served_by: str = ""
    queued_s: float = Field(0.0, description="Time between sending and a consumer picking it up.")
    judged_s: float = Field(0.0, description="Time the judge took.")
