"""Prometheus metrics of the judge service (served at GET /metrics)."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter("referee_requests_total", "HTTP requests by route and status.", ["route", "status"])
LATENCY = Histogram(
    "referee_request_seconds",
    "HTTP request latency by route.",
    ["route"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
ITEMS = Counter(
    "referee_items_total", "Items (or compared pairs) judged, by route and judge.", ["route", "judge"]
)
ITEM_ERRORS = Counter(
    "referee_item_errors_total", "Items that failed or had no valid verdict.", ["route", "judge"]
)
TOKENS = Counter("referee_tokens_total", "Tokens through the engines.", ["judge", "kind"])
ENGINE_REQUESTS = Counter("referee_engine_requests_total", "Requests submitted to vLLM.", ["judge"])
INFLIGHT = Gauge("referee_inflight_engine_requests", "Engine requests in flight.")
CACHE = Counter(
    "referee_judgment_cache_total",
    "Engine requests looked up in the judgment cache, by judge and outcome.",
    ["judge", "outcome"],
)
IMAGES = Counter("referee_images_total", "Distinct images decoded for judging, by judge.", ["judge"])
BLOB_UPLOADS = Counter(
    "referee_blob_uploads_total", "Images uploaded (POST /blobs), by outcome.", ["outcome"]
)
VERDICTS = Counter("referee_verdicts_total", "Pairwise verdicts by outcome.", ["judge", "outcome"])


def record_items(route: str, judge: str, n: int, errors: int) -> None:
    ITEMS.labels(route, judge).inc(n)
    if errors:
        ITEM_ERRORS.labels(route, judge).inc(errors)


def record_verdicts(judge: str, verdicts: Iterable[str]) -> None:
    for v in verdicts:
        VERDICTS.labels(judge, v).inc()


def record_tokens(judge: str, ctx) -> None:
    TOKENS.labels(judge, "prompt").inc(ctx.prompt_tokens)
    TOKENS.labels(judge, "completion").inc(ctx.completion_tokens)
    ENGINE_REQUESTS.labels(judge).inc(ctx.engine_requests)


QUEUE_INFLIGHT = Gauge("referee_queue_inflight_messages", "Queue messages being judged by this consumer.")
QUEUE_MESSAGES = Counter(
    "referee_queue_messages_total",
    "Queue messages answered, by type, status and outcome.",
    ["type", "status", "outcome"],
)
QUEUE_WAIT = Histogram(
    "referee_queue_wait_seconds",
    "Time from a trainer sending a message to a consumer picking it up.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
QUEUE_RECLAIMED = Counter(
    "referee_queue_reclaimed_total", "Messages taken over from a consumer that stopped."
)
QUEUE_DEAD_LETTERS = Counter("referee_queue_dead_letters_total", "Messages sent to the dead-letter stream.")
QUEUE_EXPIRED = Counter(
    "referee_queue_expired_total", "Messages answered `expired`: their deadline passed before an answer."
)
QUEUE_BACKLOG = Gauge(
    "referee_queue_backlog_messages",
    "Messages not yet delivered to any consumer, all job streams together (the same figure on every "
    "replica: aggregate with max). The autoscaler's metric.",
)
QUEUE_CONSUMING = Gauge("referee_queue_consuming", "1 while this replica's queue consumer is consuming.")

TENANT_INFLIGHT = Gauge(
    "referee_tenant_inflight_engine_requests", "Engine requests in flight by tenant.", ["tenant"]
)
TENANT_ENGINE_REQUESTS = Counter(
    "referee_tenant_engine_requests_total", "Engine requests judged, by tenant.", ["tenant"]
)
TENANT_TOKENS = Counter("referee_tenant_tokens_total", "Prompt and completion tokens, by tenant.", ["tenant"])
TENANT_REFUSED = Counter(
    "referee_tenant_refused_total",
    "Requests refused with 429, by tenant and the limit reached.",
    ["tenant", "limit"],
)
AUTH_FAILURES = Counter("referee_auth_failures_total", "Requests refused 401 (a missing or unknown key).")
ADMISSION_WAITING = Gauge("referee_admission_waiting_requests", "Requests waiting for the engines' capacity.")
