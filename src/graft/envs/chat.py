"""Where an environment's text enters the token sequence: as the suffix the chat template adds after the
conversation so far, tokenized once there. The model's turns are never rendered back into tokens.

That needs a prefix-preserving template: rendering the conversation after turn k must be a prefix of
rendering it after turn k+1, else the suffix is undefined. Templates that drop the <think> blocks of earlier
assistant turns (Qwen3's, DeepSeek-R1's) are not, but they are once the history holds each reply without
its reasoning: check_chat_template detects that, and such a Conversation keeps the replies' answers (what
the template would keep) in the messages it renders. The episode's ids still hold each reply as sampled,
<think> block included: the model is trained on the context it saw while playing, which is more than the
template would show it at inference, where earlier reasoning is gone. Other templates are refused.
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


def without_reasoning(reply: str) -> str:
    """A reply's answer: what follows its last </think>, as templates that drop reasoning keep it."""
    return reply.rsplit("</think>", 1)[-1].lstrip("\n") if "</think>" in reply else reply


def _probe(tokenizer, system_prompt, template_kwargs, replies) -> list[tuple[str, str]]:
    """(what was added, rendering) after each step of a probe conversation: user turns with the
    generation prompt, `replies` without."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    renders = []
    try:
        for k, user in enumerate(_PROBE_USERS):
            messages.append({"role": "user", "content": user})
            renders.append(("the next user turn", render(tokenizer, messages, True, template_kwargs)))
            if k < len(replies):
                messages.append({"role": "assistant", "content": replies[k]})
                renders.append(("the assistant's reply", render(tokenizer, messages, False, template_kwargs)))
    except ChatTemplateError:
        raise
    except Exception as exc:
        raise ChatTemplateError(
            f"the chat template cannot render a multi-turn conversation: {type(exc).__name__}: {exc}"
        ) from exc
    return renders


def _rewrite(renders: list[tuple[str, str]]) -> str | None:
    """Where a rendering does not extend the one before it (None: each does)."""
    for (_, before), (step, after) in zip(renders, renders[1:], strict=False):
        if not after.startswith(before):
            return f"adding {step} rewrites what was rendered before ({_difference(before, after)})"
    return None


def check_chat_template(
    tokenizer, system_prompt: str | None = None, template_kwargs: dict | None = None
) -> bool:
    """Whether the template drops earlier replies' reasoning (see the module's docstring); raises
    ChatTemplateError when multi-turn episodes cannot use it. Probes a conversation with two replies with
    <think> blocks: every rendering must extend the one before (generation prompt -> the reply -> the next
    user turn -> ...), or, with the replies' reasoning left out of the history, every rendering that ends
    in a generation prompt must extend the one before (a last reply may be rendered with an empty
    reasoning block that the next user turn takes away again)."""
    problem = _rewrite(_probe(tokenizer, system_prompt, template_kwargs, _PROBE_REPLIES))
    if problem is None:
        return False
    answers = [without_reasoning(reply) for reply in _PROBE_REPLIES]
    prompts = [
        r
        for r in _probe(tokenizer, system_prompt, template_kwargs, answers)
        if r[0] != "the assistant's reply"
    ]
    if _rewrite(prompts) is None:
        return True
    raise ChatTemplateError(
        f"the chat template is not prefix-preserving, so multi-turn episodes cannot use it: {problem}, "
        "also with the replies' <think> blocks left out of the history. Give the tokenizer a template that "
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


def _after_stop(closing: str, stop_text: str) -> str:
    """The template's closing of a reply past the model's own stop token (which the sampler already holds)."""
    return closing[len(stop_text) :] if stop_text and closing.startswith(stop_text) else closing


class Conversation:
    """One episode's chat messages and the text rendered so far, which always ends with the generation
    prompt of the model's next turn."""

    def __init__(
        self,
        tokenizer,
        system_prompt: str | None,
        first_message: str,
        template_kwargs: dict | None,
        drops_reasoning: bool = False,
    ):
        self.tokenizer, self.template_kwargs = tokenizer, template_kwargs
        self.drops_reasoning = drops_reasoning  # check_chat_template's answer for this template
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
        if self.drops_reasoning:
            return self._turn_after_answer(without_reasoning(reply), stop_id, observation)
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
        tail = _after_stop(closing, stop_text)
        messages.append({"role": "user", "content": observation})
        after = render(self.tokenizer, messages, True, self.template_kwargs)
        if not after.startswith(with_reply):
            raise ChatTemplateError(
                f"the user turn rewrites the conversation ({_difference(with_reply, after)})"
            )
        self.messages, self.rendered = messages, after
        return encode_after(self.tokenizer, tail + after[len(with_reply) :], stop_id)

    def _turn_after_answer(self, answer: str, stop_id: int, observation: str) -> list[int]:
        """environment_turn for a template that drops reasoning: the history holds the reply's answer, and
        the closing is read from the rendering with the next user turn (where the template shows earlier
        replies as it keeps them), not from one that ends with the reply."""
        messages = [*self.messages, {"role": "assistant", "content": answer}]
        messages.append({"role": "user", "content": observation})
        after = render(self.tokenizer, messages, True, self.template_kwargs)
        if not after.startswith(self.rendered + answer):
            raise ChatTemplateError(
                f"the reply's answer does not follow the conversation ({_difference(self.rendered + answer, after)})"
            )
        closing = after[len(self.rendered) + len(answer) :]
        stop_text = self.tokenizer.decode([stop_id], skip_special_tokens=False)
        self.messages, self.rendered = messages, after
        return encode_after(self.tokenizer, _after_stop(closing, stop_text), stop_id)
