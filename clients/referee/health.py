"""Judge health: whether the rewards a judge gives a job carry signal, and what they reward.

A reward can be empty (every comparison a tie, every group's win rates equal: zero advantage, the
policy learns nothing) or exploitable (the judge prefers a position or a length, and the policy learns
to please it) while training runs on and reports a reward mean. These are the figures that show it,
kept per tenant, job, judge and time window from the answers the judge already gives:

- signal: ties, invalid verdicts (and those below the judge's label mass), groups whose rewards are
  all equal (flat: zero advantage), groups whose spread is tiny (group normalisation turns it into
  full-size advantages: Pref-GRPO's "illusory advantage", Wang et al. 2025, arXiv:2508.20751), and for
  pointwise scores the share of their spread that lies within groups rather than between prompts;
- bias: verdicts that flip with the order (order=both; MT-Bench's swap test, Zheng et al. 2023), the
  share of decided comparisons won by the response shown first (order=single/random), how often the
  longer response wins, the rank correlation of reward with length inside groups, and ensemble
  members' (dis)agreement;
- drift: the same figures per window, so a job sees its rewards move as the policy learns.

Every figure is a ratio of sums (``Tally``): tallies from many replicas and requests add up, in
memory or in Redis (``HINCRBYFLOAT``), and the report is computed from them when asked.
``tally_answer`` turns one answered request into a tally; ``build_report`` turns windows of tallies
into the report with its plain-language warnings.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

from pydantic import BaseModel, Field

from .protocol import (
    JudgeRequest,
    JudgeResponse,
    PairwiseRequest,
    PairwiseResponse,
    ScoreRequest,
    ScoreResponse,
    WinRateRequest,
    WinRateResponse,
    content_text,
    image_parts,
)

Tally = Counter  # stat name -> sum (counts and sums of per-event values)

DEFAULT_WINDOW_S = 300.0  # the servers' health.window_s unless set
DEFAULT_WINDOWS = 24  # ... and health.windows
TINY_SPREAD = 0.05  # a group of win rates whose standard deviation is below this: "tiny"
DISAGREE_SPREAD = 0.25  # ensemble members' P(A) standard deviation above this: they disagree

# The stats a tally may hold (a job's Redis hash has one field per window, section and stat:
# "<window start>|<judge>/<route>|<stat>").
STATS = (
    "pairs",  # comparisons answered (valid or not)
    "pairs_tie",
    "pairs_invalid",
    "pairs_low_mass",  # invalid because the label mass was below the judge's minimum
    "pairs_both",  # compared in both orders
    "pairs_flipped",  # ... whose verdict changed with the order
    "pairs_positioned",  # decided, shown in one known order (single, random)
    "pairs_first_won",  # ... won by the response shown first
    "pairs_by_length",  # decided, the two responses of different (text) lengths
    "pairs_longer_won",
    "pairs_ensemble",  # with an ensemble's disagreement
    "pairs_disagree",  # ... above DISAGREE_SPREAD
    "groups",  # groups of >= 2 rewards (win-rate groups; scored items sharing a prompt)
    "groups_flat",  # every reward equal
    "groups_tiny",  # win rates with 0 < std < TINY_SPREAD
    "groups_std_sum",
    "groups_var_sum",  # scores: within-group variances, against the scores' overall variance
    "groups_ranked",  # groups where the length-reward rank correlation is defined
    "groups_length_rho_sum",
    "groups_members",  # groups where the members' agreement is defined (pointwise ensembles)
    "groups_members_rho_sum",
    "rewards",  # rewards given (win rates, scores)
    "rewards_sum",
    "rewards_sq_sum",
    "lengths",  # text responses measured
    "lengths_sum",
    "scored",  # the rewards above that are pointwise scores (not win rates)
)


# ---------------------------------------------------------------- maths


def _ranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    k = 0
    while k < len(order):
        end = k
        while end + 1 < len(order) and values[order[end + 1]] == values[order[k]]:
            end += 1
        for m in range(k, end + 1):
            ranks[order[m]] = (k + end) / 2.0
        k = end + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (ties get their average rank); None if either side is constant
    or there are fewer than three points."""
    if len(x) != len(y) or len(x) < 3:
        return None
    rx, ry = _ranks(x), _ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return None
    return sxy / math.sqrt(sxx * syy)


def _std(values: Sequence[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def _text_length(content) -> int | None:
    """A response's length in characters; None for one with images (its length is not the text's)."""
    if image_parts(content):
        return None
    return len(content_text(content))


# ---------------------------------------------------------------- one answer -> a tally


def _pair(t: Tally, verdict: str, error: str | None, len_a: int | None, len_b: int | None) -> None:
    t["pairs"] += 1
    if verdict == "tie":
        t["pairs_tie"] += 1
    elif verdict == "invalid":
        t["pairs_invalid"] += 1
        if error and "min_label_mass" in error:
            t["pairs_low_mass"] += 1
    elif len_a is not None and len_b is not None and len_a != len_b:
        t["pairs_by_length"] += 1
        t["pairs_longer_won"] += (verdict == "A") == (len_a > len_b)


def _lengths(t: Tally, lengths: Iterable[int | None]) -> None:
    for n in lengths:
        if n is not None:
            t["lengths"] += 1
            t["lengths_sum"] += n


def _group(t: Tally, rewards: Sequence[float], lengths: Sequence[int | None], *, scored: bool) -> None:
    """One group's rewards (win rates, or scores of responses to one prompt)."""
    t["rewards"] += len(rewards)
    t["rewards_sum"] += sum(rewards)
    t["rewards_sq_sum"] += sum(r * r for r in rewards)
    if scored:
        t["scored"] += len(rewards)
    if len(rewards) < 2:
        return
    std = _std(rewards)
    t["groups"] += 1
    t["groups_std_sum"] += std
    t["groups_var_sum"] += std * std
    if max(rewards) - min(rewards) <= 1e-9:
        t["groups_flat"] += 1
    elif not scored and std < TINY_SPREAD:
        t["groups_tiny"] += 1
    if all(n is not None for n in lengths):
        rho = spearman([float(n) for n in lengths], rewards)
        if rho is not None:
            t["groups_ranked"] += 1
            t["groups_length_rho_sum"] += rho


def tally_pairwise(req: PairwiseRequest, resp: PairwiseResponse) -> Tally:
    t = Tally()
    for item, r in zip(req.items, resp.results, strict=False):
        len_a, len_b = _text_length(item.response_a), _text_length(item.response_b)
        _lengths(t, (len_a, len_b))
        _pair(t, r.verdict, r.error, len_a, len_b)
        if r.consistent is not None:
            t["pairs_both"] += 1
            t["pairs_flipped"] += not r.consistent
        elif req.order in ("single", "random") and r.verdict in ("A", "B"):
            first_is_a = not r.swapped
            t["pairs_positioned"] += 1
            t["pairs_first_won"] += (r.verdict == "A") == first_is_a
        if r.uncertainty is not None:
            t["pairs_ensemble"] += 1
            t["pairs_disagree"] += r.uncertainty > DISAGREE_SPREAD
    return t


def tally_winrate(req: WinRateRequest, resp: WinRateResponse) -> Tally:
    t = Tally()
    lengths = [_text_length(r) for r in req.responses]
    _lengths(t, lengths)
    m = resp.win_matrix
    for i in range(len(m)):
        for j in range(i + 1, len(m)):
            if m[i][j] is None and m[j][i] is None:
                continue  # not compared (or invalid: counted below from the response's totals)
            credit = m[i][j] if m[i][j] is not None else 1.0 - m[j][i]
            verdict = "tie" if abs(credit - 0.5) <= 1e-9 else ("A" if credit > 0.5 else "B")
            li, lj = lengths[i], lengths[j]
            if verdict != "tie" and li is not None and lj is not None and li != lj:
                t["pairs_by_length"] += 1
                t["pairs_longer_won"] += (verdict == "A") == (li > lj)
    t["pairs"] += resp.comparisons
    t["pairs_tie"] += resp.ties
    t["pairs_invalid"] += resp.invalid
    t["pairs_low_mass"] += resp.low_label_mass
    if req.order == "both" and resp.inconsistent_rule is not None:
        t["pairs_both"] += resp.comparisons
        t["pairs_flipped"] += resp.inconsistent
    rated = [(w, n) for w, n in zip(resp.win_rates, lengths, strict=False) if w is not None]
    if rated:
        _group(t, [w for w, _ in rated], [n for _, n in rated], scored=False)
    return t


def _prompt_key(prompt) -> str:
    return prompt if isinstance(prompt, str) else "\x00".join(m.model_dump_json() for m in prompt)


def tally_score(req: ScoreRequest, resp: ScoreResponse) -> Tally:
    t = Tally()
    groups: dict[str, list[tuple[float, int | None, dict | None]]] = {}
    for item, r in zip(req.items, resp.results, strict=False):
        n = _text_length(item.response)
        _lengths(t, (n,))
        if r.score is None:
            continue
        groups.setdefault(_prompt_key(item.prompt), []).append((r.score, n, r.members))
    for rows in groups.values():
        _group(t, [s for s, _, _ in rows], [n for _, n, _ in rows], scored=True)
        members = [m for _, _, m in rows]
        if len(rows) >= 3 and all(members):
            names = sorted(set.intersection(*(set(m) for m in members)))
            rhos = []
            for a in range(len(names)):
                for b in range(a + 1, len(names)):
                    xs = [m[names[a]] for m in members]
                    ys = [m[names[b]] for m in members]
                    if None not in xs and None not in ys:
                        rho = spearman(xs, ys)
                        if rho is not None:
                            rhos.append(rho)
            if rhos:
                t["groups_members"] += 1
                t["groups_members_rho_sum"] += sum(rhos) / len(rhos)
    return t


def tally_judge(req: JudgeRequest, resp: JudgeResponse) -> Tally:
    t = Tally()
    groups: dict[str, list[tuple[float, int | None]]] = {}
    for item, r in zip(req.items, resp.results, strict=False):
        if r.kind == "verdict":
            len_a, len_b = _text_length(item.response_a), _text_length(item.response_b)
            _lengths(t, (len_a, len_b))
            verdict = r.verdict or "invalid"
            _pair(t, verdict, r.error, len_a, len_b)
            if verdict in ("A", "B"):  # /judge shows A first
                t["pairs_positioned"] += 1
                t["pairs_first_won"] += verdict == "A"
        else:
            n = _text_length(item.response)
            _lengths(t, (n,))
            if r.score is not None:
                groups.setdefault(_prompt_key(item.prompt), []).append((r.score, n))
    for rows in groups.values():
        _group(t, [s for s, _ in rows], [n for _, n in rows], scored=True)
    return t


_TALLIES = (
    (WinRateRequest, WinRateResponse, tally_winrate),
    (PairwiseRequest, PairwiseResponse, tally_pairwise),
    (ScoreRequest, ScoreResponse, tally_score),
    (JudgeRequest, JudgeResponse, tally_judge),
)


def tally_answer(request, response) -> Tally | None:
    """The tally of one answered native request (None for other kinds of requests)."""
    for req_type, resp_type, tally in _TALLIES:
        if isinstance(request, req_type) and isinstance(response, resp_type):
            return tally(request, response)
    return None


# ---------------------------------------------------------------- the report


class HealthFigures(BaseModel):
    """What the judge gave, as rates of what it was asked (None: nothing to measure it on)."""

    comparisons: int = Field(0, description="Pairs compared (every pairwise verdict asked for).")
    tie_rate: float | None = None
    invalid_rate: float | None = None
    low_label_mass_rate: float | None = Field(
        None, description="Comparisons invalid because the judge put too little probability on A/B."
    )
    both_order_comparisons: int = 0
    order_flip_rate: float | None = Field(
        None,
        description="order=both: the share of comparisons whose verdict changed with the order "
        "(the judge preferred a position, not a response).",
    )
    first_position_win_rate: float | None = Field(
        None,
        description="order=single/random and /judge: the share of decided comparisons won by the "
        "response shown first (0.5 when the judge has no position preference).",
    )
    longer_win_rate: float | None = Field(
        None, description="The share of decided comparisons (texts of different lengths) the longer won."
    )
    ensemble_disagreement_rate: float | None = Field(
        None, description=f"Ensembles: comparisons whose members' P(A) spread exceeds {DISAGREE_SPREAD}."
    )
    groups: int = Field(0, description="Groups of >= 2 rewards (win-rate groups; scores per prompt).")
    flat_group_rate: float | None = Field(
        None, description="Groups whose rewards are all equal: zero advantage for every response."
    )
    tiny_spread_group_rate: float | None = Field(
        None,
        description=f"Win-rate groups with 0 < std < {TINY_SPREAD}: normalised advantages make those "
        "small differences full-size.",
    )
    mean_group_std: float | None = None
    within_group_share: float | None = Field(
        None,
        description="Pointwise scores: the within-group standard deviation over the scores' overall "
        "one. Small: scores differ by prompt, barely between one prompt's responses, and group "
        "normalisation magnifies the small differences.",
    )
    length_reward_correlation: float | None = Field(
        None, description="Mean Spearman correlation of reward with response length inside groups."
    )
    member_agreement: float | None = Field(
        None, description="Pointwise ensembles: mean rank correlation between members inside groups."
    )
    rewards: int = 0
    mean_reward: float | None = None
    reward_std: float | None = None
    mean_length: float | None = Field(None, description="Mean response length (characters).")


class HealthWindow(HealthFigures):
    start: float = Field(description="The window's start (Unix time).")


class JudgeHealth(BaseModel):
    judge: str
    route: str | None = Field(
        None, description="What the judge was asked: winrate, pairwise, score or judge (each apart)."
    )
    totals: HealthFigures
    windows: list[HealthWindow] = Field(description="The same figures per window, oldest first.")
    warnings: list[str]


class HealthReport(BaseModel):
    tenant: str
    job: str | None = Field(description="The job reported on; None: all the tenant's recent jobs.")
    window_s: float
    since: float | None = Field(description="The oldest window's start.")
    judges: list[JudgeHealth]
    warnings: list[str] = Field(description="Every judge's warnings, each naming its judge.")


def _rate(t: Tally, part: str, whole: str) -> float | None:
    return round(t[part] / t[whole], 4) if t[whole] else None


def figures(t: Tally) -> HealthFigures:
    n = t["rewards"]
    mean = t["rewards_sum"] / n if n else None
    var = max(0.0, t["rewards_sq_sum"] / n - mean * mean) if n else None
    within = None
    if t["groups"] and t["scored"] and var:
        within = round(math.sqrt(t["groups_var_sum"] / t["groups"]) / math.sqrt(var), 4)
    return HealthFigures(
        comparisons=int(t["pairs"]),
        tie_rate=_rate(t, "pairs_tie", "pairs"),
        invalid_rate=_rate(t, "pairs_invalid", "pairs"),
        low_label_mass_rate=_rate(t, "pairs_low_mass", "pairs"),
        both_order_comparisons=int(t["pairs_both"]),
        order_flip_rate=_rate(t, "pairs_flipped", "pairs_both"),
        first_position_win_rate=_rate(t, "pairs_first_won", "pairs_positioned"),
        longer_win_rate=_rate(t, "pairs_longer_won", "pairs_by_length"),
        ensemble_disagreement_rate=_rate(t, "pairs_disagree", "pairs_ensemble"),
        groups=int(t["groups"]),
        flat_group_rate=_rate(t, "groups_flat", "groups"),
        tiny_spread_group_rate=_rate(t, "groups_tiny", "groups") if not t["scored"] else None,
        mean_group_std=_rate(t, "groups_std_sum", "groups"),
        within_group_share=within,
        length_reward_correlation=_rate(t, "groups_length_rho_sum", "groups_ranked"),
        member_agreement=_rate(t, "groups_members_rho_sum", "groups_members"),
        rewards=int(n),
        mean_reward=None if mean is None else round(mean, 4),
        reward_std=None if var is None else round(math.sqrt(var), 4),
        mean_length=_rate(t, "lengths_sum", "lengths"),
    )


# Warnings need enough evidence: fewer comparisons or groups than these say nothing.
MIN_PAIRS = 10
MIN_GROUPS = 4


def _pct(x: float) -> str:
    return f"{100 * x:.0f} %"


def warnings_for(t: Tally, f: HealthFigures, windows: Sequence[HealthFigures] = ()) -> list[str]:
    """Plain-language warnings when the figures say the reward is empty or suspect."""
    out: list[str] = []
    empty = f.groups >= MIN_GROUPS and (f.flat_group_rate or 0) >= 0.9
    if f.both_order_comparisons >= MIN_PAIRS and (f.order_flip_rate or 0) >= 0.3:
        out.append(
            f"{_pct(f.order_flip_rate)} of comparisons flip with the order: the judge prefers a "
            "position, not a response"
            + ("; those pairs are ties, so win rates are ties" if (f.tie_rate or 0) >= 0.5 else "")
            + ". A judge that keeps its verdict when the order changes is needed; soft win rates "
            "(soft: true, inconsistent: average) keep only the small preference left once the "
            "orders are averaged (see the spread figures)."
        )
    if t["pairs_positioned"] >= 2 * MIN_PAIRS and abs((f.first_position_win_rate or 0.5) - 0.5) >= 0.3:
        out.append(
            f"the response shown first wins {_pct(f.first_position_win_rate)} of decided comparisons: "
            "the judge prefers a position. Ask with order=both."
        )
    if f.comparisons >= MIN_PAIRS and (f.tie_rate or 0) >= 0.5 and not out:
        out.append(f"{_pct(f.tie_rate)} of comparisons are ties: win rates carry little signal.")
    if f.comparisons >= MIN_PAIRS and (f.invalid_rate or 0) >= 0.1:
        why = (
            f" ({_pct(f.low_label_mass_rate)} below the judge's min_label_mass: it did not answer A or B)"
            if f.low_label_mass_rate
            else ""
        )
        out.append(f"{_pct(f.invalid_rate)} of comparisons have no valid verdict{why}; they give no reward.")
    if empty:
        out.insert(
            0,
            f"the reward is empty: {_pct(f.flat_group_rate)} of groups gave every response the same "
            "reward, so every advantage is zero and the policy learns nothing from the judge.",
        )
    elif f.groups >= MIN_GROUPS and (f.flat_group_rate or 0) >= 0.5:
        out.append(
            f"{_pct(f.flat_group_rate)} of groups gave every response the same reward (zero advantage)."
        )
    if f.groups >= MIN_GROUPS and (f.tiny_spread_group_rate or 0) >= 0.3:
        out.append(
            f"{_pct(f.tiny_spread_group_rate)} of groups have win rates within {TINY_SPREAD} (std) of "
            "each other: group normalisation turns those small differences into full-size advantages."
        )
    if f.groups >= MIN_GROUPS and f.within_group_share is not None and f.within_group_share < 0.1:
        out.append(
            f"scores differ {1 / max(f.within_group_share, 1e-9):.0f}x more between prompts than between "
            "responses to one prompt: group normalisation magnifies differences the judge barely makes."
        )
    longer = f.longer_win_rate if t["pairs_by_length"] >= 2 * MIN_PAIRS else None
    rho = f.length_reward_correlation if t["groups_ranked"] >= MIN_GROUPS else None
    if (longer is not None and longer >= 0.8) or (rho is not None and rho >= 0.5):
        said = []
        if rho is not None:
            said.append(f"rank correlation {rho:+.2f} within groups")
        if longer is not None:
            said.append(f"the longer response wins {_pct(longer)}")
        out.append(
            f"reward rises with response length ({'; '.join(said)}): the policy can be rewarded for "
            "length alone."
        )
    if t["pairs_ensemble"] >= MIN_PAIRS and (f.ensemble_disagreement_rate or 0) >= 0.3:
        out.append(f"the ensemble's members disagree on {_pct(f.ensemble_disagreement_rate)} of comparisons.")
    agreement = f.member_agreement
    if t["groups_members"] >= MIN_GROUPS and agreement is not None and agreement < 0.3:
        out.append(f"the ensemble's members rank responses differently (mean correlation {agreement:+.2f}).")
    measured = [w for w in windows if w.longer_win_rate is not None and w.comparisons >= MIN_PAIRS]
    if len(measured) >= 2 and measured[-1].longer_win_rate - measured[0].longer_win_rate >= 0.2:
        out.append(
            f"drift: the longer response's share of wins rose from {_pct(measured[0].longer_win_rate)} to "
            f"{_pct(measured[-1].longer_win_rate)}"
            + (
                f" while responses grew from {measured[0].mean_length:.0f} to {measured[-1].mean_length:.0f} "
                "characters"
                if measured[0].mean_length and measured[-1].mean_length
                else ""
            )
            + ": the policy may be learning what the judge likes, not what is better."
        )
    return out


def section_key(judge: str, route: str) -> str:
    """A report section's key: the judge and what it was asked (judge names have no '/' nor '|')."""
    return f"{judge}/{route}"


def window_start(now: float, window_s: float) -> int:
    return int(now // window_s * window_s)


def build_report(
    windows: Mapping[int, Mapping[str, Tally]],
    *,
    tenant: str,
    job: str | None,
    window_s: float,
    keep: int | None = None,
    now: float | None = None,
) -> HealthReport:
    """The report of windows of tallies (window start -> judge -> tally): per judge, totals over
    the windows, each window's figures, and warnings."""
    starts = sorted(windows)
    if keep is not None:
        oldest = window_start(now if now is not None else time.time(), window_s) - (keep - 1) * window_s
        starts = [s for s in starts if s >= oldest]
    judges = sorted({j for s in starts for j in windows[s]})
    sections, all_warnings = [], []
    for key in judges:
        judge, _, route = key.partition("/")
        total = Tally()
        series = []
        for s in starts:
            t = windows[s].get(key)
            if t:
                total.update(t)
                series.append(HealthWindow(start=s, **figures(t).model_dump()))
        totals = figures(total)
        warnings = warnings_for(total, totals, series)
        sections.append(
            JudgeHealth(judge=judge, route=route or None, totals=totals, windows=series, warnings=warnings)
        )
        all_warnings += [f"{judge} /{route}: {w}" if route else f"{judge}: {w}" for w in warnings]
    return HealthReport(
        tenant=tenant,
        job=job,
        window_s=window_s,
        since=float(starts[0]) if starts else None,
        judges=sections,
        warnings=all_warnings,
    )


# ---------------------------------------------------------------- the Redis form


def field(judge: str, stat: str, start: int) -> str:
    """A window's stat in the job's health hash: ``<window start>|<judge>|<stat>``."""
    return f"{start}|{judge}|{stat}"


def parse_fields(raw: Mapping) -> dict[int, dict[str, Tally]]:
    """The job's health hash (HGETALL) as windows of tallies; unknown fields are skipped."""
    windows: dict[int, dict[str, Tally]] = {}
    for key, value in raw.items():
        key = key.decode() if isinstance(key, bytes) else key
        start, sep, rest = key.partition("|")
        judge, sep2, stat = rest.rpartition("|")
        if not sep or not sep2 or stat not in STATS or not start.isdigit():
            continue
        try:
            windows.setdefault(int(start), {}).setdefault(judge, Tally())[stat] += float(value)
        except ValueError:
            continue
    return windows


def _fmt(value: float | None, spec: str = "{:.2f}") -> str:
    return "-" if value is None else spec.format(value)


def format_report(report: HealthReport) -> str:
    """The report as a few plain lines (for logs, the CLI and the demo)."""
    whose = f"job {report.job}" if report.job else "all recent jobs"
    lines = [f"judge health of {whose} (tenant {report.tenant}, {len(report.judges)} judge(s))"]
    if not report.judges:
        lines.append("  nothing judged yet (tallies reach Redis within the servers' health.flush_every_s)")
    for s in report.judges:
        t = s.totals
        name = f"{s.judge} /{s.route}" if s.route else s.judge
        lines.append(
            f"  {name}: {t.comparisons} comparisons (ties {_fmt(t.tie_rate)}, invalid "
            f"{_fmt(t.invalid_rate)}, order flips {_fmt(t.order_flip_rate)}, first shown wins "
            f"{_fmt(t.first_position_win_rate)}, longer wins {_fmt(t.longer_win_rate)}); {t.groups} groups "
            f"(flat {_fmt(t.flat_group_rate)}, tiny spread {_fmt(t.tiny_spread_group_rate)}, mean std "
            f"{_fmt(t.mean_group_std, '{:.3f}')}, length-reward rho {_fmt(t.length_reward_correlation)}); "
            f"mean reward {_fmt(t.mean_reward, '{:.3f}')} over {len(s.windows)} window(s)"
        )
        lines += [f"  WARNING {w}" for w in s.warnings]
    return "\n".join(lines)
