"""Token ids of judge inputs in which user text is data, never control.

A chat template is rendered with a sentinel in place of each message's content, so the template's
own text and the user's text are known apart. The template's text is tokenised as the template
wrote it (its special tokens parsed); user text is tokenised with ``split_special_tokens=True``, so
``<|im_end|>`` in a response is seven ordinary tokens rather than the end of a turn, and no user
text can produce a special-token id, add a turn or a second BOS.

Ordinary text is tokenised exactly as the model's own tokenizer would tokenise the rendered
template: the whole text is encoded once, and its ids are used whenever every special token in it
lies in the template's own text (the usual case, so nothing changes for harmless input). Only when
user text produced a special token is the text re-encoded piece by piece: the template's special
tokens as ids, everything between them (template text and user text together, so merges across the
seam stay as they were) with special tokens split.

Text that a client formatted itself (vLLM's /classify ``input``, OpenRLHF's queries) is the
client's own template: its special tokens are parsed, but the tokenizer's BOS/EOS appear once
whatever the text carries, and the response part of an OpenRLHF query is user text.
"""

from __future__ import annotations

import copy
import re
import uuid
from collections.abc import Callable, Sequence

Segment = tuple[str, bool]  # (text, is_user_data)


# Where an image sits in a message's text: the templates write ``image_marker(k)`` for the k-th
# image of a message's ``images`` list, and ``chat_ids`` puts the model's image placeholder there
# (trusted text: its special tokens parsed). The nonce keeps user text from forging one.
_IMAGE_NONCE = uuid.uuid4().hex[:12]
_IMAGE_RE = re.compile("\ue002" + _IMAGE_NONCE + r"(\d+)\ue003")


def image_marker(k: int) -> str:
    return f"\ue002{_IMAGE_NONCE}{k}\ue003"


class UnsafeTokenization(ValueError):
    """User text produced a control token even with special tokens split (a tokenizer defect)."""


def control_ids(tokenizer) -> frozenset[int]:
    """Ids of every special token: the named ones (BOS, EOS, ...) and every special added token."""
    added = {i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special}
    return frozenset(added | set(tokenizer.all_special_ids))


def _around(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a text when asked to add its special tokens."""
    probe = "a b"
    bare = tokenizer(probe, add_special_tokens=False).input_ids
    full = tokenizer(probe, add_special_tokens=True).input_ids
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return full[:start], full[start + len(bare) :]
    raise ValueError("cannot tell which special tokens this tokenizer adds around a text")


def _overlaps(start: int, end: int, spans: Sequence[tuple[int, int]]) -> bool:
    return any(start < e and s < end for s, e in spans)


class PromptTokenizer:
    """Builds engine inputs from a Hugging Face fast tokenizer, keeping user text out of control."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        # Hugging Face implements ``split_special_tokens`` by flipping a flag on the shared Rust
        # tokenizer before each call; a tokenizer of its own for user text, always split, keeps
        # concurrent calls (tokenisation in threads) from ever seeing the other's setting.
        self._splitting = copy.deepcopy(tokenizer)
        self._splitting.split_special_tokens = True
        self.control = control_ids(tokenizer)
        self.prefix, self.suffix = _around(tokenizer)
        nonce = uuid.uuid4().hex[:8]
        self._sentinel = "\ue000" + nonce + "{}\ue001"
        self._sentinel_re = re.compile("\ue000" + nonce + r"(\d+)\ue001")
        for token in (tokenizer.eos_token, tokenizer.bos_token):
            if token:
                self.data_ids(token)  # raises where the tokenizer cannot split special tokens

    # ---------------------------------------------------------------- pieces

    def data_ids(self, text: str) -> list[int]:
        """User text as ordinary tokens: no special token is recognised in it."""
        if not text:
            return []
        ids = self._splitting(text, add_special_tokens=False, split_special_tokens=True).input_ids
        if self.control.intersection(ids):
            raise UnsafeTokenization("user text produced a special token although special tokens were split")
        return ids

    def _controls(self, text: str) -> list[tuple[int, int, int]]:
        """(start, end, id) of each special token the tokenizer finds in trusted text."""
        if not text:
            return []
        enc = self.tokenizer(
            text, add_special_tokens=False, split_special_tokens=False, return_offsets_mapping=True
        )
        return [
            (s, e, i)
            for i, (s, e) in zip(enc.input_ids, enc.offset_mapping, strict=True)
            if i in self.control
        ]

    def segments_ids(self, segments: Sequence[Segment]) -> list[int]:
        """Ids of a text made of trusted template text and user data, no special tokens added."""
        text = "".join(t for t, _ in segments)
        data: list[tuple[int, int]] = []
        trusted: list[tuple[int, str]] = []
        at = 0
        for t, is_data in segments:
            if is_data:
                data.append((at, at + len(t)))
            else:
                trusted.append((at, t))
            at += len(t)
        # The usual case: every special token is the template's own; use the tokenizer's own ids.
        enc = self.tokenizer(
            text, add_special_tokens=False, split_special_tokens=False, return_offsets_mapping=True
        )
        if not any(
            i in self.control and _overlaps(s, e, data)
            for i, (s, e) in zip(enc.input_ids, enc.offset_mapping, strict=True)
        ):
            return list(enc.input_ids)
        # User text made special tokens: cut at the template's own special tokens only.
        cuts = sorted((at + s, at + e, i) for at, t in trusted for s, e, i in self._controls(t))
        ids: list[int] = []
        pos = 0
        for start, end, tid in cuts:
            ids += self.data_ids(text[pos:start])
            ids.append(tid)
            pos = end
        ids += self.data_ids(text[pos:])
        return ids

    def _once(self, ids: list[int], add_special_tokens: bool) -> list[int]:
        """The tokenizer's BOS (and EOS, where it adds one) exactly once: added when asked for,
        and repeats that the text carried collapsed into one."""
        for edge in ("prefix", "suffix"):
            mark: list[int] = getattr(self, edge)
            if not mark:
                continue
            n, found = len(mark), False
            if edge == "prefix":
                while ids[:n] == mark:
                    ids, found = ids[n:], True
                ids = mark + ids if (found or add_special_tokens) else ids
            else:
                while len(ids) >= n and ids[-n:] == mark:
                    ids, found = ids[:-n], True
                ids = ids + mark if (found or add_special_tokens) else ids
        return ids

    # ---------------------------------------------------------------- inputs

    def chat_ids(
        self,
        messages: Sequence[dict],
        *,
        generation_prompt: bool,
        placeholder: Callable[[int], str] | None = None,
        images: list | None = None,
    ) -> list[int]:
        """A conversation in the model's chat template; every message content is user data.

        Contents enter the template as sentinels wrapped in their own leading and trailing
        whitespace, so a template that trims contents (Llama-3's does) trims exactly that.

        A message may carry ``images``, marked in its content by ``image_marker(k)``: each marker
        becomes ``placeholder(n)`` (the model's image placeholder for the n-th image, 1-based) and
        its image is appended to ``images``, in the order of the prompt."""
        cores: list[tuple[str, list]] = []
        masked = []
        for m in messages:
            content = m.get("content")
            pictures = m.get("images") or []
            m = {k: v for k, v in m.items() if k != "images"}
            if isinstance(content, str):
                core = content.strip()
                lead = content[: len(content) - len(content.lstrip())]
                trail = content[len(lead) + len(core) :]
                m = {**m, "content": lead + self._sentinel.format(len(cores)) + trail}
                cores.append((core, pictures))
            masked.append(m)
        rendered = self.tokenizer.apply_chat_template(
            masked, tokenize=False, add_generation_prompt=generation_prompt
        )
        parts = self._sentinel_re.split(rendered)
        segments: list[Segment] = []
        for k, part in enumerate(parts):
            if not k % 2:
                segments.append((part, False))
                continue
            core, pictures = cores[int(part)]
            pieces = _IMAGE_RE.split(core)
            for j, piece in enumerate(pieces):
                if not j % 2:
                    segments.append((piece, True))
                    continue
                if placeholder is None or images is None:
                    raise ValueError("this model sees text only: a prompt with images cannot be built for it")
                images.append(pictures[int(piece)])
                segments.append((placeholder(len(images)), False))
        return self.segments_ids(segments)

    def plain_ids(self, texts: Sequence[str], separator: str = "\n\n") -> list[int]:
        """User texts joined by a separator (models without a chat template), BOS/EOS once."""
        segments: list[Segment] = []
        for k, t in enumerate(texts):
            segments += [(separator, False)] if k else []
            segments.append((t, True))
        return self._once(self.segments_ids(segments), True)

    def formatted_ids(self, text: str, *, add_special_tokens: bool = True, data: str = "") -> list[int]:
        """Text the client formatted for the model (its own template: special tokens parsed),
        then optional user ``data`` (a response). A response's trailing EOS text (OpenRLHF decodes
        the policy's end of sequence into the query) stays the end of sequence; any other special
        token text in it is data."""
        tail = ""
        eos = self.tokenizer.eos_token
        if data and eos and data.endswith(eos):
            data, tail = data[: -len(eos)], eos
        ids = self.segments_ids([(text, False), (data, True), (tail, False)])
        return self._once(ids, add_special_tokens)
