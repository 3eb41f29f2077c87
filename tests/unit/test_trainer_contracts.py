"""What trainers rely on, without a server: one group-by-prompt rule, and one definition of the
SDK's defaults (nowhere else in the SDK or the trainer written out again). Against the real server:
``tests/serving/test_trainer_contracts.py``."""

from __future__ import annotations

import ast
import asyncio
import inspect
import os

from referee import AsyncReferee, QueueReferee, Referee
from referee.defaults import DEFAULT_PREFIX, DEFAULT_REDIS_URL, DEFAULT_URL
from referee.rewards import group_by_prompt, prompt_key
from referee.trl import ScoreReward
from referee.verl import compute_score
from tests.support import REPO


def _chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_group_by_prompt_groups_by_the_prompt_and_keeps_a_single_response_alone():
    chat = _chat("Q")
    same_chat = [{"content": "Q", "role": "user"}]  # the same message, fields in another order
    prompts = [chat, "Q", same_chat, 1, "1", "Q", "alone", chat]
    assert group_by_prompt(prompts) == [[0, 2, 7], [1, 5], [3], [4], [6]]
    assert prompt_key(chat) == prompt_key(same_chat) and prompt_key(1) != prompt_key("1")
    assert group_by_prompt([]) == []
    assert group_by_prompt(["only"]) == [[0]]  # a group of one, never merged into another


def test_the_defaults_are_defined_once(monkeypatch):
    from referee.acl import acl_rules
    from referee.keys import Keys
    from referee.queue import redis_url
    from trainer.settings import TrainSettings

    def default(func, name):
        return inspect.signature(func).parameters[name].default

    assert default(Referee, "base_url") is DEFAULT_URL and default(AsyncReferee, "base_url") is DEFAULT_URL
    assert default(compute_score, "url") is DEFAULT_URL
    assert default(QueueReferee, "prefix") is DEFAULT_PREFIX and Keys().prefix is DEFAULT_PREFIX
    assert default(acl_rules, "prefix") is DEFAULT_PREFIX
    monkeypatch.delenv("REDIS_URL", raising=False)
    assert redis_url() == DEFAULT_REDIS_URL

    async def trl_client_url() -> str:
        reward = ScoreReward()
        url = reward.client().base_url
        await reward.aclose()
        return url

    assert asyncio.run(trl_client_url()) == DEFAULT_URL
    for name in [k for k in os.environ if k.startswith("REFEREE_TRAIN_")]:
        monkeypatch.delenv(name)
    settings = TrainSettings()
    assert settings.server_url == DEFAULT_URL and settings.redis_prefix == DEFAULT_PREFIX
    # ... and nowhere else in the SDK or the trainer is one written out again (examples in docs aside).
    sources = [*(REPO / "clients" / "referee").glob("*.py"), *(REPO / "services" / "trainer").glob("*.py")]
    again = [f for path in sources if path.name != "defaults.py" for f in _written_out_defaults(path)]
    assert again == [], "import these from referee.defaults instead"


def _written_out_defaults(path) -> list[str]:
    """The default URLs as string literals, and the default prefix as a parameter's or a name's value."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        values: list[ast.expr] = []
        if isinstance(node, ast.Constant) and node.value in (DEFAULT_URL, DEFAULT_REDIS_URL):
            values.append(node)
        elif isinstance(node, ast.arguments):
            values += [d for d in [*node.defaults, *node.kw_defaults] if _is(d, DEFAULT_PREFIX)]
        elif isinstance(node, ast.Assign | ast.AnnAssign) and _is(node.value, DEFAULT_PREFIX):
            values.append(node.value)
        found += [f"{path.relative_to(REPO)}:{v.lineno}: {ast.literal_eval(v)!r}" for v in values]
    return found


def _is(node: ast.expr | None, value: str) -> bool:
    return isinstance(node, ast.Constant) and node.value == value
