"""Chat SFT: conversations rendered with the tokenizer's chat template, loss on assistant turns only.

Records are OpenAI-style ``{"messages": [{"role", "content"}, ...]}`` or ShareGPT-style
``{"conversations": [{"from": "human" | "gpt" | "system", "value"}, ...]}``. Each conversation is
one SFT example: the same token + ``_mask`` files, packing and document masks as the alpaca path
(``megalong.data.sft``). Which tokens are targets (mask 1) is found from the template itself::

    R = render(messages)                                         the whole conversation, one string
    for every assistant turn i:
        P = render(messages[:i],   add_generation_prompt=True)   … up to and with the assistant header
        F = render(messages[:i+1])                               … through the turn's end
        need P ⊑ F ⊑ R (the template is prefix-stable); the turn is R[len(P):len(F)]
    tokens of R (one tokenizer call, character offsets): a token is a target if it overlaps a turn,
    cut after the turn's last end-of-turn token (so ChatML's "\\n" after <|im_end|> is not trained)

    <|im_start|>system\\n…<|im_end|>\\n<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nHello<|im_end|>\\n
    └────────────────────────── no loss (system, user, header) ───────────────────┘└─ loss ──────┘└ no

Templates that are not prefix-stable (a later message changes how an earlier turn renders: history
reasoning dropped, the system prompt moved to the last user turn) are refused with the turn named.
A template that marks assistant text with ``{% generation %}`` blocks is used as its author marked
it instead (transformers' ``return_assistant_tokens_mask``), prefix-stable or not; that is also the
fix for the templates refused above (``--chat-template FILE``).

End-of-turn tokens: the tokenizer's EOS and the ``eos_token_id`` of a ``generation_config.json``
beside it (Llama 3's ``<|eot_id|>``, Gemma's ``<end_of_turn>``). The rendered text is tokenized
as ``apply_chat_template`` does at inference (special-token strings become special tokens, no
tokens added).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np

from megalong.data.indexed import DataFileError
from megalong.data.tokenizer import TokenizerError

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "tool": "tool"}
"""ShareGPT ``from`` values and the chat roles they map to."""
ROLES = ("system", "user", "assistant", "tool")
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
_PROBE = [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "Seven."},
          {"role": "user", "content": "And an even one?"}, {"role": "assistant", "content": "Two."}]


class ChatTemplateError(ValueError):
    """A conversation the template cannot render, or renders in a way that hides the assistant turns."""


def conversation_of(record: dict, where: str) -> list[dict] | None:
    """The messages of one record (roles mapped to system/user/assistant/tool), or None to skip it.

    Skipped (counted, like an empty alpaca output): blank lines, empty conversations, and
    conversations without an assistant turn that has text. Anything malformed raises.
    """
    if not record:
        return None
    keys = [k for k in ("messages", "conversations") if k in record]
    if len(keys) != 1:
        have = ", ".join(map(str, record)) or "none"
        raise DataFileError(f"{where}: a chat record needs exactly one of 'messages' (OpenAI: role/content) or "
                            f"'conversations' (ShareGPT: from/value); keys: {have}")
    turns = record[keys[0]]
    if not isinstance(turns, list):
        raise DataFileError(f"{where}: {keys[0]!r} is {type(turns).__name__}, not a list of messages")
    out = [_message(m, f"{where}: {keys[0]}[{k}]") for k, m in enumerate(turns)]
    if out and out[0]["role"] == "assistant":
        raise DataFileError(f"{where}: {keys[0]}[0] is an assistant turn: its prompt cannot be rendered; start the "
                            "conversation with a system or user turn (or drop the leading assistant turn)")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in out):
        return None
    return out


def _message(m: object, where: str) -> dict:
    if not isinstance(m, dict):
        raise DataFileError(f"{where} is {type(m).__name__}, not an object with role/content or from/value")
    if "role" in m:
        role, text_key, known = m["role"], "content", {r: r for r in ROLES}
    elif "from" in m:
        role, text_key, known = m["from"], "value", SHAREGPT_ROLES
    else:
        raise DataFileError(f"{where}: a message needs 'role' and 'content' (OpenAI) or 'from' and 'value' "
                            f"(ShareGPT); keys: {', '.join(map(str, m)) or 'none'}")
    if role not in known:
        raise DataFileError(f"{where}: unknown role {role!r}; use one of {', '.join(known)} (rename it in the data)")
    text = m.get(text_key)
    if not isinstance(text, str):
        raise DataFileError(f"{where}: {text_key!r} is {type(text).__name__}, not a string (text parts, tool "
                            "calls and images are not supported; flatten them into the text)")
    extra = {k: v for k, v in m.items() if k not in ("role", "content", "from", "value")}
    return {**extra, "role": known[role], "content": text}


def _end_token_ids(tok, path: Path) -> list[int]:
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    gen = path / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text(encoding="utf-8")).get("eos_token_id")
        ids |= set(eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else [])
    return sorted(ids)


class ChatEncoder:
    """Tokens and loss mask of conversations under a chat template (module docstring).

    Args:
        tokenizer: HF tokenizer directory (``tokenizer.json``).
        template: Jinja chat template text; None: the tokenizer's own.
        template_source: where ``template`` came from (error messages).
    """

    def __init__(self, tokenizer: str | os.PathLike, template: str | None = None,
                 template_source: str | None = None) -> None:
        from transformers import AutoTokenizer

        path = Path(tokenizer)
        if not (path / "tokenizer.json").is_file():
            raise TokenizerError(f"{path}: --sft chat needs an HF tokenizer directory (tokenizer.json), as shipped "
                                 "with the instruct model; a SentencePiece .model file has no chat template")
        try:
            self.tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as e:
            raise TokenizerError(f"{path}: transformers cannot load this tokenizer ({e})") from e
        self.template = template if template is not None else self.tok.chat_template
        self.source = template_source or str(path)
        if isinstance(self.template, dict):  # several named templates: the one apply_chat_template uses
            self.template = self.template.get("default")
        if self.template is not None and not isinstance(self.template, str):
            raise TokenizerError(f"{self.source}: the chat template is a {type(self.template).__name__}, not one Jinja "
                                 "template; pass --chat-template FILE with the one to use")
        if not self.template:
            raise TokenizerError(f"{path}: the tokenizer has no chat template (none in tokenizer_config.json, no "
                                 "chat_template.jinja); pass --chat-template FILE (a Jinja template, e.g. the "
                                 "instruct model's chat_template.jinja) or use --sft alpaca")
        self.method = "generation" if _GENERATION_TAG.search(self.template) else "prefix"
        self.end_ids = _end_token_ids(self.tok, path)
        self.sha256 = hashlib.sha256(self.template.encode()).hexdigest()

    def describe(self) -> dict:
        """What the data sidecar records about the chat rendering."""
        return {"template_sha256": self.sha256, "mask": self.method, "end_token_ids": self.end_ids}

    def check_template(self) -> None:
        """Render a probe conversation (no tokenizing: the parent process must not start the
        tokenizer's thread pool before forking workers); raises TokenizerError naming the problem."""
        try:
            if self.method == "prefix":
                self.assistant_spans(_PROBE)
            else:
                self._render(_PROBE, False)
        except ChatTemplateError as e:
            raise TokenizerError(f"chat template of {self.source}, on a probe conversation (user, assistant, user, "
                                 f"assistant): {e}") from e

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        import jinja2

        try:
            return self.tok.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                add_generation_prompt=generation_prompt)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"the template refuses the conversation ({type(e).__name__}: {e})") from e

    def assistant_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and each assistant turn's character span in it."""
        full, spans = self._render(messages, False), []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            head, turn = self._render(messages[:i], True), self._render(messages[:i + 1], False)
            if not turn.startswith(head):
                raise ChatTemplateError(f"messages[{i}] (assistant): the generation prompt of messages[:{i}] is not a "
                                        "prefix of the conversation with this turn, so the assistant header cannot "
                                        "be told from the reply; add {% generation %} blocks to the template")
            if not full.startswith(turn):
                raise ChatTemplateError(f"messages[{i}] (assistant): the template renders this turn differently once "
                                        "later messages follow (not prefix-stable: it drops or moves earlier text, "
                                        "e.g. past reasoning or the system prompt); pass --chat-template FILE with a "
                                        "prefix-stable template or one with {% generation %} blocks")
            spans.append((len(head), len(turn)))
        return full, spans

    def encode_batch(self, conversations: list[list[dict]]) -> list[tuple[list[int], np.ndarray, int]]:
        """(ids, mask, assistant turns without an end-of-turn token) per conversation."""
        if not conversations:
            return []
        if self.method == "generation":
            return [self._encode_generation(c) for c in conversations]
        rendered = [self.assistant_spans(c) for c in conversations]
        enc = self.tok([r for r, _ in rendered], add_special_tokens=False, return_offsets_mapping=True,
                       verbose=False)  # no "longer than model_max_length" warning: long rows are the point
        return [self._mask(ids, np.asarray(off, np.int64).reshape(-1, 2), spans)
                for ids, off, (_, spans) in zip(enc["input_ids"], enc["offset_mapping"], rendered)]

    def _mask(self, ids: list[int], offsets: np.ndarray, spans: list[tuple[int, int]]):
        mask, open_turns = np.zeros(len(ids), np.uint8), 0
        is_end = np.isin(np.asarray(ids, np.int64), self.end_ids)
        for s, e in spans:
            hit = np.flatnonzero((offsets[:, 0] < e) & (offsets[:, 1] > s))  # tokens overlapping the turn
            if not len(hit):
                continue
            a, b = int(hit[0]), int(hit[-1]) + 1
            ends = np.flatnonzero(is_end[a:b])
            if len(ends):
                b = a + int(ends[-1]) + 1  # through the end-of-turn token, not the separator after it
            else:
                open_turns += 1
            mask[a:b] = 1
        return list(ids), mask, open_turns

    def _encode_generation(self, messages: list[dict]):
        import jinja2

        try:
            out = self.tok.apply_chat_template(messages, chat_template=self.template, tokenize=True,
                                               return_dict=True, return_assistant_tokens_mask=True,
                                               tokenizer_kwargs={"verbose": False})
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"the template refuses the conversation ({type(e).__name__}: {e})") from e
        ids, mask = list(out["input_ids"]), np.asarray(out["assistant_masks"], np.uint8)
        if not mask.any():
            raise ChatTemplateError("the template's {% generation %} blocks mark no token of this conversation; "
                                    "put them around the assistant content")
        ends = np.isin(np.asarray(ids, np.int64), self.end_ids) & mask.astype(bool)
        run = np.cumsum(np.diff(np.concatenate([[0], mask.astype(np.int64)])) == 1) * mask  # 1, 2, …: marked runs
        return ids, mask, int(run.max()) - len(np.unique(run[ends]))


def encode_chat_records(chat: ChatEncoder, records: list[dict], dtype: np.dtype, source: str = "",
                        first: int = 1):
    """Encode chat records into flat tokens + loss mask (an ``Encoded`` from megalong.data.preprocess).

    ``source`` and ``first`` (the first record's line/number) only serve error messages.
    """
    from megalong.data.preprocess import Encoded

    convs = [(first + k, conversation_of(r, f"{source}:{first + k}")) for k, r in enumerate(records)]
    keep = [(line, c) for line, c in convs if c is not None]
    try:
        encoded = chat.encode_batch([c for _, c in keep])
    except ChatTemplateError:  # find the record: encode one by one
        for line, c in keep:
            try:
                chat.encode_batch([c])
            except ChatTemplateError as e:
                raise DataFileError(f"{source}:{line}: chat template of {chat.source}: {e}") from e
        raise
    if not encoded:
        return Encoded(np.zeros(0, dtype), np.zeros(0, np.int64), np.zeros(0, np.uint8), len(records))
    return Encoded(np.concatenate([np.asarray(ids, dtype) for ids, _, _ in encoded]),
                   np.asarray([len(ids) for ids, _, _ in encoded], np.int64),
                   np.concatenate([m for _, m, _ in encoded]), len(records) - len(keep),
                   open_turns=sum(n for _, _, n in encoded))
