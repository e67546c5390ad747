"""Where an environment's text enters the token sequence: as the suffix the chat template adds after the
conversation so far, tokenized once there. The model's turns are never rendered back into tokens.

That is only sound for a prefix-preserving template: rendering the conversation after turn k must be a
prefix of rendering it after turn k+1, else the ids the model saw (sampled turn by turn) are not what the
template would show it, and the suffix is undefined. Templates that drop the <think> blocks of earlier
assistant turns (Qwen3's, DeepSeek-R1's) are not; check_chat_template refuses them before any sampling.
"""

from __future__ import annotations

from graft.config import ConfigError

# a reply with a reasoning block, so that templates which drop earlier reasoning are caught
_PROBE_REPLIES = ("<think>\nfirst thoughts\n</think>\nfirst answer", "<think>\nmore\n</think>\nsecond answer")
_PROBE_USERS = ("first question", "feedback one", "feedback two")


class ChatTemplateError(ConfigError):
    """A chat template multi-turn episodes cannot use."""


def render(
    tokenizer, messages: list[dict], generation_prompt: bool, template_kwargs: dict | None = None
) -> str:
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt, **(template_kwargs or {})
    )
    if not isinstance(text, str):
        raise ChatTemplateError(
            f"apply_chat_template(tokenize=False) returned {type(text).__name__}, not text"
        )
    return text


def _difference(before: str, after: str) -> str:
    i = next(
        (k for k, (a, b) in enumerate(zip(before, after, strict=False)) if a != b),
        min(len(before), len(after)),
    )
    return f"at character {i}: {before[max(0, i - 30) : i + 30]!r} became {after[max(0, i - 30) : i + 30]!r}"


def check_chat_template(
    tokenizer, system_prompt: str | None = None, template_kwargs: dict | None = None
) -> None:
    """Raise ChatTemplateError unless every rendering of a probe conversation (two replies with <think>
    blocks) extends the one before: generation prompt -> the reply -> the next user turn -> ..."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    renders = []
    try:
        for k, user in enumerate(_PROBE_USERS):
            messages.append({"role": "user", "content": user})
            renders.append(("the next user turn", render(tokenizer, messages, True, template_kwargs)))
            if k < len(_PROBE_REPLIES):
                messages.append({"role": "assistant", "content": _PROBE_REPLIES[k]})
                renders.append(("the assistant's reply", render(tokenizer, messages, False, template_kwargs)))
    except ChatTemplateError:
        raise
    except Exception as exc:
        raise ChatTemplateError(
            f"the chat template cannot render a multi-turn conversation: {type(exc).__name__}: {exc}"
        ) from exc
    for (_, before), (step, after) in zip(renders, renders[1:], strict=False):
        if not after.startswith(before):
            raise ChatTemplateError(
                "the chat template is not prefix-preserving, so multi-turn episodes cannot use it: adding "
                f"{step} rewrites what was rendered before ({_difference(before, after)}). Templates that "
                "drop earlier <think> blocks from the history do this. Give the tokenizer a template that "
                "renders every turn as it was written (tokenizer.chat_template)."
            )


def encode_after(tokenizer, text: str, previous_id: int) -> list[int]:
    """`text`'s ids as the full rendering would tokenize it right after token `previous_id` (the model's
    end-of-turn token): encoded behind that token's text, whose id is then dropped. Some tokenizers treat
    the start of a string specially (a SentencePiece prefix space); behind a special token they do what
    they do inside the rendering. Falls back to encoding `text` alone when the anchor does not round-trip."""
    if not text:
        return []
    anchor = tokenizer.decode([previous_id], skip_special_tokens=False)
    ids = tokenizer(anchor + text, add_special_tokens=False)["input_ids"]
    if anchor and ids[:1] == [previous_id]:
        return list(ids[1:])
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class Conversation:
    """One episode's chat messages and the text rendered so far, which always ends with the generation
    prompt of the model's next turn."""

    def __init__(
        self, tokenizer, system_prompt: str | None, first_message: str, template_kwargs: dict | None
    ):
        self.tokenizer, self.template_kwargs = tokenizer, template_kwargs
        self.messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        self.messages.append({"role": "user", "content": first_message})
        self.rendered = render(tokenizer, self.messages, True, template_kwargs)

    def prompt_ids(self) -> list[int]:
        return list(self.tokenizer(self.rendered, add_special_tokens=False)["input_ids"])

    def environment_turn(self, reply: str, stop_id: int, observation: str) -> list[int]:
        """The ids that follow the model's stop token `stop_id`: the rest of the template's closing of the
        reply (e.g. the newline after <|im_end|>), the user turn holding `observation`, and the generation
        prompt of the next reply. If the model stopped with another token than the template closes replies
        with (an EOS that is not the end-of-turn token), the template's whole closing follows that token.
        Raises ChatTemplateError when the rendering of this conversation is not prefix-preserving."""
        messages = [*self.messages, {"role": "assistant", "content": reply}]
        with_reply = render(self.tokenizer, messages, False, self.template_kwargs)
        if not with_reply.startswith(self.rendered):
            raise ChatTemplateError(
                f"the reply rewrites the conversation ({_difference(self.rendered, with_reply)})"
            )
        written = with_reply[len(self.rendered) :]  # the template's rendering of this reply
        stop_text = self.tokenizer.decode([stop_id], skip_special_tokens=False)
        if written.startswith(reply):
            closing = written[len(reply) :]
        elif stop_text and stop_text in written:  # the template edits the reply (e.g. strips it)
            closing = written[written.rindex(stop_text) :]
        else:
            raise ChatTemplateError(
                f"cannot find where the template's rendering of the reply ends ({written[-60:]!r})"
            )
        tail = closing[len(stop_text) :] if stop_text and closing.startswith(stop_text) else closing
        messages.append({"role": "user", "content": observation})
        after = render(self.tokenizer, messages, True, self.template_kwargs)
        if not after.startswith(with_reply):
            raise ChatTemplateError(
                f"the user turn rewrites the conversation ({_difference(with_reply, after)})"
            )
        self.messages, self.rendered = messages, after
        return encode_after(self.tokenizer, tail + after[len(with_reply) :], stop_id)
