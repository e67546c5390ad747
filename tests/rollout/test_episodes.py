"""Multi-turn episodes on a tiny random Llama and scripted environments: the trained sequence is exactly the
sampled ids plus the environment's ids as tokenized where they entered, the loss mask zeroes the latter, a
plain training forward over the compact sequence reproduces the sampler's log-probs, and a broken
environment or a limit ends only its own episode, flagged."""

from __future__ import annotations

import copy
import threading
import time

import pytest
import torch

from conftest import build_tiny_model
from graft.batch import concat_rollouts, select_groups
from graft.envs import Environment, StepResult
from graft.envs.chat import ChatTemplateError, check_chat_template
from graft.rollout.episodes import sample_episodes
from graft.rollout.sampler import position_ids_from_mask

PAD, START, STOP = 0, 1, 2
NEWLINE = 74  # the character tokenizer's id of "\n"


def biased_model(tokenizer, bias: dict[int, float], seed: int = 0):
    """The tiny Llama with a bias on its LM head: a random model almost never samples its stop token."""
    model = build_tiny_model(len(tokenizer), seed=seed)
    head = torch.nn.Linear(model.config.hidden_size, len(tokenizer), bias=True)
    head.weight = model.lm_head.weight
    with torch.no_grad():
        head.bias.zero_()
        for token, value in bias.items():
            head.bias[token] = value
    model.lm_head = head
    return model.eval()


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    # stops after ~4 tokens on average, and samples the pad id now and then: padding is never read from ids
    return biased_model(tiny_tokenizer, {STOP: 3.0, PAD: 1.5})


class Scripted(Environment):
    """Answers turn k of row `n` with a text whose length depends on both, ends after row["turns"] turns;
    records what it received and what it returned."""

    system_prompt = "Play."
    log: list = []

    def reset(self, row: dict) -> str:
        self.row, self.k, self.received, self.returned = row, 0, [], []
        Scripted.log.append(self)
        return f"Start {row['n']}."

    def step(self, reply: str) -> StepResult:
        self.k += 1
        self.received.append(reply)
        text = "ok " * (1 + (self.row["n"] * 3 + self.k) % 5) + str(self.k)
        self.returned.append(text)
        return StepResult(text, done=self.k >= self.row["turns"], info={"k": self.k})


def entry_ids(tokenizer, observation: str) -> list[int]:
    """What the tiny chat template adds after a reply's <|im_end|>, tokenized on its own (the character
    tokenizer has no context effects, so this is the reference for the sampler's tokenization)."""
    text = f"\n<|im_start|>user\n{observation}<|im_end|>\n<|im_start|>assistant\n"
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def play(model, tokenizer, rows, **kw):
    Scripted.log = []
    options = dict(group_size=2, env_factory=Scripted, max_new_tokens=12, max_turns=5, stop_ids=[STOP])
    options.update(kw)
    options.setdefault("generator", torch.Generator().manual_seed(0))
    return sample_episodes(model, tokenizer, rows, **options)


ROWS = [{"n": 0, "turns": 4}, {"n": 1, "turns": 2}, {"n": 2, "turns": 5}]


def test_trained_ids_are_the_sampled_ids_then_the_environments_ids(model, tiny_tokenizer):
    batch = play(model, tiny_tokenizer, ROWS)
    r = batch.rollout
    B = len(ROWS) * 2
    assert r.completion_ids.shape[0] == B and r.group_size == 2 and not batch.failed.any()
    assert len(Scripted.log) == B
    seen_pad = False
    for i, (ep, env) in enumerate(zip(batch.episodes, Scripted.log, strict=True)):
        assert ep.row == ROWS[i // 2] and env.row == ep.row
        # the prompt: the template's rendering of the system prompt and reset's text, tokenized once
        prompt = tiny_tokenizer.apply_chat_template(
            [{"role": "system", "content": "Play."}, {"role": "user", "content": f"Start {ep.row['n']}."}],
            tokenize=False,
            add_generation_prompt=True,
        )
        expected_prompt = tiny_tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert r.prompt_ids[i][r.prompt_mask[i].bool()].tolist() == expected_prompt
        # the completion: each reply as sampled, then the environment's reply as the template adds it
        expected, loss = [], []
        for k, reply in enumerate(ep.reply_ids):
            expected += reply
            loss += [1] * len(reply)
            seen_pad |= PAD in reply[:-1]
            if k < len(ep.env_ids):
                # the sampled stop token ends the turn; the newline the template puts after it is the env's
                assert reply[-1] == STOP
                env = entry_ids(tiny_tokenizer, Scripted.log[i].returned[k])
                assert ep.env_ids[k] == env and env[0] == NEWLINE
                expected += env
                loss += [0] * len(env)
        n = len(expected)
        assert r.completion_ids[i, :n].tolist() == expected == ep.completion_ids()
        assert r.completion_mask[i].tolist() == [1] * n + [0] * (r.completion_ids.shape[1] - n)
        assert r.loss_mask[i, :n].tolist() == loss and not r.loss_mask[i, n:].any()
        assert not r.logprobs[i][r.loss_mask[i] == 0].any() and (r.logprobs[i][r.loss_mask[i] == 1] < 0).all()
        # the environment got the reply's text, without its stop token
        received = Scripted.log[i].received
        assert received == ep.replies[: len(received)]
        assert all(
            tiny_tokenizer.decode(ids[:-1], skip_special_tokens=True) == t
            for ids, t in zip(ep.reply_ids, received, strict=False)
        )
        if ep.done:
            assert ep.num_turns == ep.row["turns"] and not r.truncated[i] and ep.info == {"k": ep.num_turns}
        assert ep.completion_messages()[0]["role"] == "assistant"
    assert seen_pad, "the sampled pad id should occur mid-reply at least once in this batch"
    assert max(ep.num_turns for ep in batch.episodes) >= 3 and sum(ep.done for ep in batch.episodes) >= 3


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_training_forward_reproduces_the_sampler_logprobs(model, tiny_tokenizer, temperature, top_p):
    r = play(model, tiny_tokenizer, ROWS, temperature=temperature, top_p=top_p).rollout
    ids = torch.cat([r.prompt_ids, r.completion_ids], dim=1)
    mask = torch.cat([r.prompt_mask, r.completion_mask], dim=1)
    with torch.no_grad():
        logits = model(
            input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)
        ).logits.float()
    P = r.prompt_ids.shape[1]
    logp = torch.log_softmax(logits[:, P - 1 : -1] / temperature, dim=-1)
    logp = logp.gather(2, r.completion_ids[..., None]).squeeze(2)  # (B, T)
    trained = r.loss_mask.bool()
    assert trained.sum() > 20
    # float32 throughout; the sampler's cache holds holes the compact forward has not, so sums run over
    # other lengths in another order: a few ulp of O(1) log-probs (5e-7 measured); a position off by one moves them by 2e-4
    assert torch.allclose(logp[trained], r.logprobs[trained], atol=1e-5, rtol=0)


def test_lora_wrapped_policy_samples_episodes(model, tiny_tokenizer):
    from graft.config import LoraConfig
    from graft.models import add_lora

    policy = add_lora(biased_model(tiny_tokenizer, {STOP: 3.0}), LoraConfig(r=4), seed=0)
    batch = play(policy, tiny_tokenizer, ROWS[:1], max_turns=3)
    assert not batch.failed.any() and batch.rollout.loss_mask.sum() > 0


def with_template(tokenizer, template: str):
    out = copy.deepcopy(tokenizer)  # the session fixture stays as it is
    out.chat_template = template
    return out


# earlier assistant turns lose their <think> block (a simple form of DeepSeek-R1's rule)
DROPPING = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' and not loop.last %}{{ m['content'].split('</think>')[-1].lstrip() }}"
    "{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen3's rule: replies after the last user turn show their reasoning, an empty block when they have none;
# earlier ones show their answer only
QWEN3_LIKE = (
    "{% set ns = namespace(last=-1) %}{% for m in messages %}{% if m['role'] == 'user' %}"
    "{% set ns.last = loop.index0 %}{% endif %}{% endfor %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}"
    "{% set answer = m['content'].split('</think>')[-1].lstrip('\n') %}"
    "{% set thought = m['content'].split('</think>')[0].split('<think>')[-1].strip('\n') "
    "if '</think>' in m['content'] else '' %}"
    "{% if loop.index0 > ns.last %}<think>\n{{ thought }}\n</think>\n\n{{ answer }}"
    "{% else %}{{ answer }}{% endif %}{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# shows the last two messages only: no history the episode's ids could extend
WINDOW = (
    "{% for m in messages[-2:] %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_a_template_that_rewrites_history_is_refused(tiny_tokenizer):
    assert check_chat_template(tiny_tokenizer) is False  # prefix-preserving as it is
    assert check_chat_template(tiny_tokenizer, "a system prompt") is False
    window = with_template(tiny_tokenizer, WINDOW)
    with pytest.raises(ChatTemplateError, match="not prefix-preserving.*also with the replies' <think>"):
        check_chat_template(window)
    with pytest.raises(ChatTemplateError, match="not prefix-preserving"):
        play(build_tiny_model(len(window)), window, ROWS[:1])
    assert Scripted.log == []  # refused before any environment ran


@pytest.mark.parametrize("template", [DROPPING, QWEN3_LIKE])
def test_a_template_that_drops_earlier_reasoning_is_detected_and_handled(tiny_tokenizer, template):
    from graft.envs.chat import Conversation

    tokenizer = with_template(tiny_tokenizer, template)
    assert check_chat_template(tokenizer) is True and check_chat_template(tokenizer, "Play.") is True
    conversation = Conversation(tokenizer, "Play.", "Start.", None, drops_reasoning=True)
    prompt = conversation.prompt_ids()
    # each environment turn is the template's closing of the reply and the next user turn, tokenized
    # once, whatever reasoning the reply held; the history keeps the answers, as the template would
    for k, reply in enumerate(["<think>\nhmm\n</think>\n\nfirst", "second", "<think>\nso\n</think>\nthird"]):
        assert conversation.environment_turn(reply, STOP, f"feedback {k}") == entry_ids(
            tokenizer, f"feedback {k}"
        )
    assert [m["content"] for m in conversation.messages if m["role"] == "assistant"] == [
        "first",
        "second",
        "third",
    ]
    assert conversation.prompt_ids()[: len(prompt)] == prompt

    # whole episodes: the trained sequence is the sampled ids plus those environment turns
    batch = play(biased_model(tokenizer, {STOP: 3.0}), tokenizer, ROWS[:2], max_turns=3)
    for episode, ids in zip(batch.episodes, batch.rollout.completion_ids, strict=True):
        expected = []
        for k, reply in enumerate(episode.reply_ids):
            expected += reply
            if k < len(episode.env_ids):
                assert episode.env_ids[k] == entry_ids(tokenizer, episode.observations[k])
                expected += episode.env_ids[k]
        assert ids[: len(expected)].tolist() == expected
    assert max(e.num_turns for e in batch.episodes) >= 2


class Broken(Environment):
    """Row "mode" picks how it breaks, at its second step (or at reset)."""

    release = threading.Event()  # lets the abandoned hanging call finish when the test is over

    def reset(self, row: dict):
        self.mode, self.k = row["mode"], 0
        if self.mode == "reset_raises":
            raise RuntimeError("no game today")
        if self.mode == "reset_garbage":
            return 42
        return "Go."

    def step(self, reply: str):
        self.k += 1
        if self.k < 2 or self.mode == "ok":
            return StepResult("more", done=self.k >= 3)
        if self.mode == "raises":
            raise ValueError("boom")
        if self.mode == "hangs":
            Broken.release.wait(30)
            return StepResult("late", done=True)
        if self.mode == "not_a_result":
            return "more"
        if self.mode == "bad_observation":
            return StepResult(["more"])
        if self.mode == "bad_info":
            return StepResult("more", info="nope")
        return StepResult("more", done="yes")


MODES = [
    "ok",
    "raises",
    "hangs",
    "not_a_result",
    "bad_observation",
    "bad_info",
    "bad_done",
    "reset_raises",
    "reset_garbage",
]


def test_a_broken_environment_ends_only_its_own_episode(model, tiny_tokenizer):
    always_stops = biased_model(tiny_tokenizer, {STOP: 8.0})  # every reply ends: each env reaches step 2
    start = time.monotonic()
    try:
        batch = sample_episodes(
            always_stops, tiny_tokenizer, [{"mode": m} for m in MODES], group_size=2, env_factory=Broken,
            max_new_tokens=6, max_turns=4, stop_ids=[STOP], env_timeout=0.5,
            generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
    finally:
        Broken.release.set()
    assert time.monotonic() - start < 10  # the hanging step cost its timeout, not its 30 s
    kinds = {
        m: {str(e.failure).split(":")[0] if e.failure else None for e in batch.episodes[2 * k : 2 * k + 2]}
        for k, m in enumerate(MODES)
    }
    assert kinds == {
        "ok": {None}, "raises": {"error"}, "hangs": {"timeout"}, "not_a_result": {"invalid"},
        "bad_observation": {"invalid"}, "bad_info": {"invalid"}, "bad_done": {"invalid"},
        "reset_raises": {"error"}, "reset_garbage": {"invalid"},
    }  # fmt: skip
    assert batch.failed.tolist() == [m != "ok" for m in MODES for _ in range(2)]
    assert batch.failure_counts() == {"error": 4, "timeout": 2, "invalid": 10}
    assert "boom" in str(batch.episodes[2].failure) and "0.5 s" in str(batch.episodes[4].failure)
    ok = batch.episodes[:2]
    assert all(e.done and e.num_turns == 3 for e in ok)  # the healthy episodes played on to the end
    assert all(e.num_turns == 2 for e in batch.episodes[2:14])  # failed at their second step
    r = batch.rollout
    for i in (14, 15, 16, 17):  # failed before a prompt: one placeholder id, nothing sampled
        assert r.prompt_mask[i].sum() == 1 and not r.completion_mask[i].any() and not r.loss_mask[i].any()
    assert batch.metrics()["episodes/failed"] == pytest.approx(16 / 18)


def test_limits_end_episodes_truncated(model, tiny_tokenizer):
    never_done = [{"n": 0, "turns": 99}, {"n": 1, "turns": 99}]
    batch = play(biased_model(tiny_tokenizer, {STOP: 8.0}), tiny_tokenizer, never_done, max_turns=3)
    assert all(e.truncated == "max_turns" and e.num_turns == 3 for e in batch.episodes)
    assert all(
        len(e.env_ids) == 2 and len(e.observations) == 3 for e in batch.episodes
    )  # the last reply was stepped
    assert batch.rollout.truncated.all()

    never_stops = biased_model(tiny_tokenizer, {STOP: -30.0})
    batch = play(never_stops, tiny_tokenizer, never_done, max_new_tokens=5)
    assert all(e.truncated == "max_new_tokens" and e.reply_ids == [e.reply_ids[0]] for e in batch.episodes)
    assert batch.rollout.completion_mask.sum(1).tolist() == [5] * 4 and Scripted.log[0].received == []

    batch = play(model, tiny_tokenizer, never_done, max_turns=50, max_episode_tokens=60)
    lengths = batch.rollout.completion_mask.sum(1)
    assert (lengths <= 60).all() and all(e.truncated == "max_episode_tokens" for e in batch.episodes)
    assert batch.rollout.truncated.all()


def test_a_stop_token_the_template_does_not_close_with_is_followed_by_the_templates_closing(tiny_tokenizer):
    """Stopping on another stop id (an EOS that is not the end-of-turn token): the environment's ids start
    with the template's own end-of-turn token, so the conversation still reads as the template renders it."""
    other = tiny_tokenizer.convert_tokens_to_ids(".")
    model = biased_model(tiny_tokenizer, {other: 4.0})
    batch = play(model, tiny_tokenizer, ROWS[:2], stop_ids=[STOP, other])
    checked = 0
    for i, ep in enumerate(batch.episodes):
        for k, env in enumerate(ep.env_ids):
            if ep.reply_ids[k][-1] == other:
                assert env == [STOP] + entry_ids(tiny_tokenizer, Scripted.log[i].returned[k])
                checked += 1
    assert checked


def test_loss_mask_survives_select_and_concat(model, tiny_tokenizer):
    r = play(model, tiny_tokenizer, ROWS).rollout
    picked = select_groups(r, [2, 0])
    assert torch.equal(picked.loss_mask, torch.cat([r.loss_mask[4:6], r.loss_mask[0:2]]))
    plain = select_groups(r, [1])
    plain.loss_mask = None  # a single-turn rollout: its loss mask is its completion mask
    both = concat_rollouts([picked, plain], pad_id=PAD)
    T = both.completion_ids.shape[1]
    assert torch.equal(both.loss_mask[:4, : picked.loss_mask.shape[1]], picked.loss_mask)
    assert torch.equal(both.loss_mask[4:, : plain.completion_mask.shape[1]], plain.completion_mask)
    assert both.loss_mask.shape == (6, T)
    assert concat_rollouts([plain, plain], pad_id=PAD).loss_mask is None


def test_a_template_that_fails_on_one_conversation_fails_only_that_episode(tiny_tokenizer):
    picky = copy.deepcopy(tiny_tokenizer)
    picky.chat_template = (
        "{% for m in messages %}{% if m['content'] == 'ok ok ok 2' %}{{ raise_exception('not this one') }}"
        "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    batch = play(biased_model(picky, {STOP: 8.0}), picky, ROWS)
    assert [str(e.failure).split(":")[0] if e.failed else None for e in batch.episodes] == [
        "template", "template", None, None, None, None,
    ]  # fmt: skip
    assert "turn 2: " in str(batch.episodes[0].failure) and "not this one" in str(batch.episodes[0].failure)
    assert all(e.done for e in batch.episodes[2:])


def test_problems_are_rows():
    from graft.rollout.episodes import as_row
    from graft.tasks.base import Problem

    assert as_row(Problem("What?", "42", {"secret": "crane"})) == {
        "prompt": "What?",
        "answer": "42",
        "secret": "crane",
    }
    with pytest.raises(TypeError, match="dict or a graft Problem"):
        as_row("crane")


@pytest.mark.slow
def test_builtin_model_episodes_read_as_the_template_renders_them(builtin_model):
    """SmolLM2 (a byte-level BPE tokenizer, its real template): each episode's ids decode to exactly the
    template's rendering of its conversation, and the training pass reproduces the sampler's log-probs."""
    from graft.envs.examples import GuessNumber
    from graft.models import stop_token_ids

    model, tokenizer = builtin_model
    batch = sample_episodes(
        model, tokenizer, [{"secret": 42}], group_size=2, env_factory=GuessNumber, max_new_tokens=16,
        max_turns=3, stop_ids=stop_token_ids(model, tokenizer), temperature=0.7,
        system_prompt="Reply with a single number and nothing else.", generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    r = batch.rollout
    assert max(e.num_turns for e in batch.episodes) >= 2
    for i, ep in enumerate(batch.episodes):
        n = int(r.completion_mask[i].sum())
        ids = r.prompt_ids[i][r.prompt_mask[i].bool()].tolist() + r.completion_ids[i, :n].tolist()
        rendered = tokenizer.apply_chat_template(ep.messages(), tokenize=False)
        closing = "<|im_end|>\n" if ep.truncated == "max_new_tokens" else "\n"  # after a cut reply: all of it
        assert tokenizer.decode(ids, skip_special_tokens=False) + closing == rendered
    full = torch.cat([r.prompt_ids, r.completion_ids], dim=1)
    mask = torch.cat([r.prompt_mask, r.completion_mask], dim=1)
    with torch.no_grad():
        logits = model(input_ids=full, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    P = r.prompt_ids.shape[1]
    logp = torch.log_softmax(logits[:, P - 1 : -1].float() / 0.7, dim=-1)
    logp = logp.gather(2, r.completion_ids[..., None]).squeeze(2)
    trained = r.loss_mask.bool()
    assert torch.allclose(logp[trained], r.logprobs[trained], atol=1e-4, rtol=0)  # 1.3e-5 measured


def test_greedy_episodes_do_not_depend_on_their_batch(model, tiny_tokenizer):
    """The holes other rows leave in the shared cache change nothing: greedy episodes of a row alone equal
    the same row's episodes in a batch with rows of other lengths."""
    together = play(model, tiny_tokenizer, ROWS, greedy=True)
    for k, row in enumerate(ROWS):
        alone = play(model, tiny_tokenizer, [row], greedy=True)
        assert [e.completion_ids() for e in alone.episodes] == [
            e.completion_ids() for e in together.episodes[2 * k : 2 * k + 2]
        ]
    assert len({len(e.completion_ids()) for e in together.episodes}) > 1


def served(model, tiny_model_dir, monkeypatch, **engine_args):
    """A VllmBackend on the fake engine (tests/fakes/fake_vllm.py) running `model` itself, synced."""
    from fakes import fake_vllm
    from graft.rollout.vllm_backend import LOGPROBS_MODE, VllmBackend

    fake_vllm.install(monkeypatch)
    llm = fake_vllm.LLM(str(tiny_model_dir), logprobs_mode=LOGPROBS_MODE, **engine_args)
    llm.model.hf = model  # the biased model, which stops: the folder's random one would not
    engine = VllmBackend(llm, sleep=bool(engine_args.get("enable_sleep_mode")))
    engine.sync_weights(model)
    return engine


def test_episodes_through_a_vllm_engine_are_the_models_episodes(
    model, tiny_tokenizer, tiny_model_dir, monkeypatch
):
    engine = served(model, tiny_model_dir, monkeypatch)
    direct = play(model, tiny_tokenizer, ROWS, greedy=True)
    through = play(model, tiny_tokenizer, ROWS, greedy=True, engine=engine)
    assert [e.completion_ids() for e in through.episodes] == [e.completion_ids() for e in direct.episodes]
    assert max(e.num_turns for e in through.episodes) >= 3  # several turns, each a request
    d, t = direct.rollout, through.rollout
    assert torch.equal(t.loss_mask, d.loss_mask) and torch.equal(t.truncated, d.truncated)
    # the engine runs each request from scratch, graft's decoder from its cache: float32 in another order
    assert torch.allclose(t.logprobs, d.logprobs, atol=1e-5, rtol=0)
    assert t.sampler == "vllm" and t.entropy is None  # the loss corrects for the engine (grpo.tis_cap)

    # token in, token out: each turn's request is the episode's prompt and every id after it so far (its
    # replies and the environment's turns), so the engine's prefix cache serves the conversation
    requests = [ids for ids, _ in engine.llm.requests]
    expected = []
    for row, episode in enumerate(through.episodes):
        prompt = t.prompt_ids[row][t.prompt_mask[row].bool()].tolist()
        ids, sampled = episode.completion_ids(), t.loss_mask[row].tolist()
        starts = [k for k in range(len(ids)) if sampled[k] and (k == 0 or not sampled[k - 1])]
        expected += [prompt + ids[:k] for k in starts]  # one request per reply
    assert sorted(requests) == sorted(expected) and len(requests) == sum(
        e.num_turns for e in through.episodes
    )


def test_a_sleeping_engine_rests_after_the_episodes_not_between_turns(
    model, tiny_tokenizer, tiny_model_dir, monkeypatch
):
    engine = served(model, tiny_model_dir, monkeypatch, enable_sleep_mode=True)
    batch = play(model, tiny_tokenizer, ROWS, temperature=0.7, engine=engine)
    assert max(e.num_turns for e in batch.episodes) >= 3  # it generated turn after turn awake
    assert engine.llm.sleeping == {"weights", "kv_cache"}  # and released its memory at the end
