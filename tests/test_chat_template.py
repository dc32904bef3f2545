"""The chat template: tokens equal the documented text, the mask covers exactly the answers, history fits."""

from __future__ import annotations

import numpy as np
import pytest

from jaxgpt.chat.template import ChatError, check_messages, fit_history, render
from jaxgpt.core.errors import UserError
from jaxgpt.tokenizer import EOT_ID, load_tokenizer

CONVERSATION = [
    {"role": "system", "content": "You answer in one line."},
    {"role": "user", "content": "Who rules Zorbia?"},
    {"role": "assistant", "content": "Queen Ilsa, since 1802."},
    {"role": "user", "content": "And its capital?\nBe short."},
    {"role": "assistant", "content": "Quellburg."},
]
TEXT = (
    "<|endoftext|>System: You answer in one line.\nUser: Who rules Zorbia?\nAssistant: Queen Ilsa, since 1802."
    "<|endoftext|>User: And its capital?\nBe short.\nAssistant: Quellburg.<|endoftext|>"
)


def test_tokens_are_the_documented_text_and_the_mask_covers_exactly_the_answers() -> None:
    tokenizer = load_tokenizer()
    rendered = render(CONVERSATION, load_tokenizer())
    assert tokenizer.decode(rendered.tokens) == TEXT
    # each piece is encoded on its own; for ordinary text that equals encoding the whole conversation
    assert rendered.tokens.tolist() == tokenizer.encode(TEXT, allow_eot=True)
    assert rendered.tokens.shape == rendered.mask.shape and set(np.unique(rendered.mask)) == {0, 1}
    trained = rendered.tokens[rendered.mask == 1]
    assert tokenizer.decode(trained) == " Queen Ilsa, since 1802.<|endoftext|> Quellburg.<|endoftext|>"
    assert rendered.mask[0] == 0 and rendered.tokens[0] == EOT_ID


def test_markers_are_the_same_tokens_whatever_the_content() -> None:
    odd = [{"role": "user", "content": "x:"}, {"role": "assistant", "content": "\n:User"}]
    tokens = render(odd, load_tokenizer()).tokens.tolist()
    assert tokens[1:3] == load_tokenizer().encode("User:")
    prompt = render(odd[:1], load_tokenizer(), add_generation_prompt=True).tokens.tolist()
    assert prompt == tokens[: len(prompt)]  # what the model is prompted with is what it was trained after
    assert load_tokenizer().decode(prompt).endswith("\nAssistant:")


def test_bad_messages_are_refused() -> None:
    for messages, reason in [
        ([], "non-empty list"),
        ("hello", "non-empty list"),
        ([{"role": "bot", "content": "x"}], "role 'bot'"),
        ([{"role": "user"}], "'role' and 'content'"),
        ([{"role": "user", "content": None}], "not text"),
    ]:
        with pytest.raises(ChatError, match=reason):
            check_messages(messages)


def test_fit_history_drops_the_oldest_turns_and_keeps_the_system_prompt() -> None:
    full = len(render(CONVERSATION[:4], load_tokenizer(), add_generation_prompt=True).tokens)
    assert fit_history(CONVERSATION[:4], full, load_tokenizer()) == (CONVERSATION[:4], 0)
    kept, dropped = fit_history(CONVERSATION[:4], full - 1, load_tokenizer())
    assert dropped == 2 and kept == [CONVERSATION[0], CONVERSATION[3]]  # never starts with an assistant turn
    assert len(render(kept, load_tokenizer(), add_generation_prompt=True).tokens) <= full - 1
    alone = len(render(kept, load_tokenizer(), add_generation_prompt=True).tokens)
    with pytest.raises(UserError, match="the last message needs"):
        fit_history(CONVERSATION[:4], alone - 1, load_tokenizer())
