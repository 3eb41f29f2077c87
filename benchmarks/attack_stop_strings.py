"""One tenant's OpenAI-style request with a flood of stop strings, against the others' liveness.

Sends one ``/v1/completions`` with 100,000 ``stop`` strings, ``n: 8``, ``max_tokens: 128`` (about
1 MB, under every size limit) while another client probes ``/healthz`` and sends one-item ``/score``
requests in a loop, and prints what each saw. Start a server first, e.g. with the embedded judge
alone (``judges: [{name: smollm2, kind: generative, model: "embedded:smollm2"}]``), then:

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/attack_stop_strings.py http://127.0.0.1:8000

Results: RELIABILITY.md, "One tenant against the others, over HTTP".
"""

from __future__ import annotations

import json
import sys
import threading
import time

import httpx


def main(url: str, judge: str = "smollm2") -> None:
    body = {
        "model": judge,
        "prompt": "Say hi.",
        "max_tokens": 128,
        "n": 8,
        "stop": [f"s{k}" for k in range(100_000)],
    }
    print("body bytes", len(json.dumps(body)))
    probes: list[float] = []
    scores: list[tuple[int, float]] = []
    done = threading.Event()

    def others() -> None:
        with httpx.Client(base_url=url, timeout=120) as c:
            while not done.is_set():
                t = time.monotonic()
                c.get("/healthz")
                probes.append(time.monotonic() - t)
                t = time.monotonic()
                r = c.post("/score", json={"judge": judge, "items": [{"prompt": "q", "response": "a"}]})
                scores.append((r.status_code, time.monotonic() - t))
                time.sleep(0.05)

    thread = threading.Thread(target=others)
    thread.start()
    time.sleep(1)
    t = time.monotonic()
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=600)
    took = time.monotonic() - t
    time.sleep(0.5)
    done.set()
    thread.join()
    print(f"attack: {r.status_code} in {took:.2f}s: {r.text[:160]}")
    print(
        f"/healthz probes {len(probes)}, worst {max(probes):.3f}s; the other client's /score "
        f"{len(scores)}, worst {max(s for _, s in scores):.3f}s, statuses {sorted({c for c, _ in scores})}"
    )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000")
