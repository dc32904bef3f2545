"""Chatting with a model: the template of :mod:`jaxgpt.chat.template` plus generating a reply.

``render(messages, tokenizer)`` gives a conversation's tokens and loss mask; ``generate_reply(model, messages)``
the assistant's next message, streamed, within the model's context.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import jax
from jax.sharding import Mesh

from jaxgpt.chat.template import Message, Rendered, fit_history, render
from jaxgpt.core.errors import UserError
from jaxgpt.model.gpt import GPT
from jaxgpt.sampling.generate import generate
from jaxgpt.tokenizer import Tokenizer

__all__ = ["Message", "Rendered", "Reply", "fit_history", "generate_reply", "render"]


def prompt_room(model: GPT, max_new_tokens: int) -> int:
    """Tokens of the model's context left for the conversation once ``max_new_tokens`` are set aside."""
    room = model.config.block_size - max_new_tokens
    if room < 1:
        raise UserError(
            f"max_new_tokens={max_new_tokens} leaves no room for the conversation in the model's "
            f"{model.config.block_size}-token context; ask for fewer"
        )
    return room


@dataclasses.dataclass(frozen=True)
class Reply:
    """What ``generate_reply`` returns: the answer's text and the history to continue the conversation from."""

    text: str  # the assistant's answer, without leading whitespace (the template's space) and closing EOT
    history: list[Message]  # the messages the reply saw (oldest turns dropped to fit), then the reply
    dropped: int  # messages dropped from the front of the history to fit the context
    finished: bool  # the model closed its turn (False: it ran into max_new_tokens)


def generate_reply(
    model: GPT,
    messages: Sequence[Mapping[str, str]],
    max_new_tokens: int = 256,
    *,
    tokenizer: Tokenizer,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    key: jax.Array | None = None,
    on_token: Callable[[int, int], None] | None = None,
    mesh: Mesh | None = None,
) -> Reply:
    """The assistant's next message after ``messages``, streamed through ``on_token(0, token)`` as it comes.

    The history is cut from the oldest turn on so that prompt and ``max_new_tokens`` fit the model's
    context (``Reply.dropped`` says how many messages went). Generation stops at the end of the turn.
    """
    history, dropped = fit_history(messages, prompt_room(model, max_new_tokens), tokenizer)
    prompt = render(history, tokenizer, add_generation_prompt=True).tokens
    new = generate(
        model, [prompt], max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, key=key,
        stop_at_eot=True, on_token=on_token, mesh=mesh, eot_id=tokenizer.eot_id,
    )[0]  # fmt: skip
    finished = bool(new) and new[-1] == tokenizer.eot_id
    text = tokenizer.decode(new[:-1] if finished else new).lstrip()  # the marker's space, a model's newline
    return Reply(text, [*history, {"role": "assistant", "content": text}], dropped, finished)
