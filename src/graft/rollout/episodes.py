"""Multi-turn episodes as a rollout, token in and token out: the model's turns and an environment's turns in
one id sequence per episode, the model's ids exactly as sampled and the environment's tokenized once, where
they enter (graft.envs.chat). A GRPO group is G episodes of the same row, adjacent in the batch.

The KV cache carries over from turn to turn: after a turn, each continuing row's environment ids (behind
its stop token, which was sampled but not yet fed) are appended with one forward over just those ids,
instead of re-encoding the conversation. The rows of a batch share one cache and move in lockstep, so
differences in length become holes in the attention mask: a row whose reply ended idles (its new columns
masked out) until the turn's longest reply ends, and each row's environment ids are left-padded to the
longest (so one `logits_to_keep=1` forward gives every row's next-token logits). Explicit position ids
count real tokens only, so every token sees the positions and the context it has in the compact sequence
the training pass runs on. Why not a cache per row: decoding would run one row at a time, which on a CPU
costs several times more than a batched step (SmolLM2: ~11 tok/s at batch 1, ~100 at batch 32). The
price of the shared cache is the idle rows' share of each decode step, bounded by the spread of reply
lengths within a turn; taking them out and back in would need cache surgery beyond the public cache API
(batch_select_indices), which every model's cache supports. Finished episodes leave the cache between
turns.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from graft.batch import Rollout
from graft.envs.base import Environment
from graft.envs.chat import Conversation, check_chat_template
from graft.envs.episode import Episode, EpisodeBatch, as_row
from graft.envs.guard import INVALID, Failure, call_all, check_reset, check_step, make_envs
from graft.kv_cache import cache_kwargs, output_cache
from graft.rollout.sampler import (
    _filter_top_p,
    _sample_categorical,
    left_pad,
    position_ids_from_mask,
    reserve_cache,
)

TEMPLATE = "template"  # failure kind: the chat template could not render this episode's conversation
MAX_NEW_TOKENS, MAX_TURNS, MAX_EPISODE_TOKENS = "max_new_tokens", "max_turns", "max_episode_tokens"

__all__ = ["Episode", "EpisodeBatch", "as_row", "sample_episodes"]


class _Decoder:
    """The batched decode state of the live episodes: one KV cache, its attention mask with holes, each
    row's next position and next-token logits. Row r of every tensor is episode self.rows[r]."""

    def __init__(self, model, pad_id: int, draw: Callable):
        self.model, self.pad_id, self.draw, self.device = model, pad_id, draw, model.device

    def forward(self, input_ids: torch.Tensor, new_mask: torch.Tensor, positions: torch.Tensor, **kwargs):
        self.attention = torch.cat([self.attention, new_mask], dim=1)  # (n, L + E)
        out = self.model(
            input_ids=input_ids,
            attention_mask=self.attention,
            position_ids=positions,
            use_cache=True,
            **cache_kwargs(self.model, self.cache),
            **kwargs,
        )
        self.cache = output_cache(out)
        return out.logits[:, -1, :].float()  # (n, V)

    def prefill(self, rows: list[int], prompts: list[list[int]], capacity: int) -> None:
        """Each distinct prompt once (a group usually shares one), then the cache rows repeated per episode."""
        distinct = list(dict.fromkeys(map(tuple, prompts)))
        where = {p: k for k, p in enumerate(distinct)}
        ids, mask = left_pad([list(p) for p in distinct], self.pad_id)
        ids, mask = ids.to(self.device), mask.to(self.device)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=position_ids_from_mask(mask),
            use_cache=True,
            logits_to_keep=1,
        )
        pick = torch.tensor([where[tuple(p)] for p in prompts], device=self.device)
        self.cache = output_cache(out)
        self.cache.batch_select_indices(pick)
        self.cache = reserve_cache(self.cache, capacity)
        self.rows, self.attention = rows, mask[pick]
        self.logits = out.logits[:, -1, :].float()[pick]  # (n, V)
        self.next_position = mask.sum(dim=1)[pick]  # (n,) real tokens so far

    def turn(self, limits: list[int], stop: set[int]) -> list[tuple[list[int], list[float], list[float]]]:
        """One reply per row: (ids, log-probs, entropies), each ending at a stop token or at the row's limit.
        The last id of each reply is sampled but not fed: it enters the cache with the next append."""
        n = len(self.rows)
        out: list[tuple[list[int], list[float], list[float]]] = [([], [], []) for _ in range(n)]
        writing = list(range(n))
        while writing:
            index = torch.tensor(writing, device=self.device)
            token, logp, entropy = self.draw(self.logits[index])
            still = []
            for j, (r, t, lp, h) in enumerate(
                zip(writing, token.tolist(), logp.tolist(), entropy.tolist(), strict=True)
            ):
                out[r][0].append(t)
                out[r][1].append(lp)
                out[r][2].append(h)
                if t not in stop and len(out[r][0]) < limits[r]:
                    still.append(j)
            if not still:
                break
            keep = torch.tensor(still, device=self.device)
            rows = index[keep]
            inputs = torch.full((n, 1), self.pad_id, dtype=torch.long, device=self.device)
            inputs[rows, 0] = token[keep]
            new_mask = torch.zeros((n, 1), dtype=torch.long, device=self.device)
            new_mask[rows] = 1  # rows done with this turn idle behind a hole
            logits = self.forward(inputs, new_mask, self.next_position[:, None])
            self.logits[rows] = logits[rows]
            self.next_position[rows] += 1
            writing = [writing[j] for j in still]
        return out

    def keep(self, positions: list[int]) -> None:
        """Only rows `positions` (indices into self.rows) go on; the others leave the cache."""
        index = torch.tensor(positions, dtype=torch.long, device=self.device)
        self.cache.batch_select_indices(index)
        self.rows = [self.rows[p] for p in positions]
        self.attention, self.next_position = self.attention[index], self.next_position[index]

    def append(self, sequences: list[list[int]]) -> None:
        """Feed each row its ids (left-padded to the longest), so every row's logits come from the last
        column; the padding is a hole and positions continue each row's own count."""
        n, width = len(sequences), max(len(s) for s in sequences)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        offsets = torch.zeros((n, width), dtype=torch.long)
        for r, seq in enumerate(sequences):
            ids[r, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[r, width - len(seq) :] = 1
            offsets[r, width - len(seq) :] = torch.arange(len(seq))
        positions = self.next_position[:, None] + offsets.to(self.device)  # (n, E)
        self.logits = self.forward(ids.to(self.device), mask.to(self.device), positions, logits_to_keep=1)
        self.next_position = self.next_position + mask.sum(dim=1).to(self.device)


class _EngineDecoder:
    """The live episodes as token sequences for a rollout engine with its own copy of the policy (vLLM:
    graft.rollout.vllm_backend.VllmBackend.complete): each turn is one request per live row, its prefix
    cache keeping the turns before. The same four calls as _Decoder, the same rule: a reply's last id is
    sampled but not fed, it enters the sequence with the next append. The engine reports no entropy."""

    def __init__(self, engine, temperature: float, top_p: float, greedy: bool, generator):
        from graft.rollout.vllm_backend import vllm_sampling_problem

        if problem := vllm_sampling_problem(top_p, 0):
            raise ValueError(problem)
        self.engine, self.generator = engine, generator
        self.temperature, self.greedy = temperature, greedy

    def prefill(self, rows: list[int], prompts: list[list[int]], capacity: int) -> None:
        self.rows, self.sequences = rows, [list(p) for p in prompts]

    def turn(self, limits: list[int], stop: set[int]) -> list[tuple[list[int], list[float], list[float]]]:
        replies = self.engine.complete(
            self.sequences, limits, stop_ids=sorted(stop), temperature=self.temperature,
            greedy=self.greedy, generator=self.generator,
        )  # fmt: skip
        for sequence, (ids, _) in zip(self.sequences, replies, strict=True):
            sequence += ids[:-1]
        return [(ids, logps, [0.0] * len(ids)) for ids, logps in replies]

    def keep(self, positions: list[int]) -> None:
        self.rows = [self.rows[p] for p in positions]
        self.sequences = [self.sequences[p] for p in positions]

    def append(self, sequences: list[list[int]]) -> None:
        for sequence, new in zip(self.sequences, sequences, strict=True):
            sequence += new


def _drawer(temperature: float, top_p: float, greedy: bool, generator: torch.Generator | None) -> Callable:
    def draw(logits: torch.Tensor):  # (n, V) float32 -> token (n,), log-prob (n,), entropy (n,)
        # as graft.rollout.sampler: the log-prob of softmax(logits / T) before top-p, which the training
        # pass recomputes; greedy decoding reports temperature-1 log-probs
        scaled = logits if greedy or temperature == 1.0 else logits / temperature
        logp = torch.log_softmax(scaled, dim=-1)
        probs = logp.exp()
        if greedy:
            token = probs.argmax(dim=-1)
        else:
            token = _sample_categorical(_filter_top_p(probs, top_p) if top_p < 1.0 else probs, generator)
        return token, logp.gather(1, token[:, None]).squeeze(1), -(probs * logp).nansum(dim=-1)

    return draw


@torch.no_grad()  # not inference_mode: the rollout tensors feed autograd in the training pass
def sample_episodes(
    model,
    tokenizer,
    rows: Sequence,
    *,
    group_size: int,
    env_factory: Callable[[], Environment],
    max_new_tokens: int,
    max_turns: int,
    stop_ids: list[int],
    max_episode_tokens: int | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
    system_prompt: str | None = None,
    env_timeout: float | None = 30.0,
    template_kwargs: dict | None = None,
    engine=None,
) -> EpisodeBatch:
    """Play `group_size` episodes of each row (dicts, or graft Problems), B = len(rows) * group_size.

    Limits: a reply stops at a stop token or after `max_new_tokens`; at most `max_turns` replies; at most
    `max_episode_tokens` ids after the prompt (replies and environment turns). A reply cut by a limit ends
    its episode, truncated, without an environment step (the reply is incomplete); after the last allowed
    reply the environment still steps (so it can score it) and the episode is truncated unless it says
    done. `system_prompt` overrides the environment's. Each environment call (factory, reset, step) runs
    with `env_timeout` seconds (None: no deadline, in this thread); one that raises, hangs or returns the
    wrong types ends its own episode, failed (Episode.failure, EpisodeBatch.failed). Raises
    ChatTemplateError before sampling when the chat template is not prefix-preserving. `engine`: a rollout
    engine with its own copy of the policy (a VllmBackend) samples the model's turns instead of `model`
    (whose device the tensors then take); its rollout has no entropy and names the engine as its sampler.

    Returns the rollout: completion_ids (B, T) = the ids after the prompt; completion_mask = 1 on each of
    them (attention); loss_mask = 1 on the sampled ones only; logprobs / entropy on sampled ids, 0 on
    the environment's; truncated (B,). An episode that failed before its prompt existed gets a one-id
    placeholder prompt (pad, mask 1) so that no row of a training forward is wholly masked.
    """
    if (
        min(group_size, max_new_tokens, max_turns, 1 if max_episode_tokens is None else max_episode_tokens)
        < 1
        or not stop_ids
    ):
        raise ValueError(
            "group_size, max_new_tokens, max_turns and max_episode_tokens must be >= 1, stop_ids non-empty"
        )
    if not greedy and temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    budget = max_episode_tokens if max_episode_tokens is not None else 1 << 62
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    stop = set(stop_ids)
    episodes = [Episode(row=as_row(row)) for row in rows for _ in range(group_size)]
    B = len(episodes)

    envs = make_envs(env_factory, B, env_timeout)
    for ep, env in zip(episodes, envs, strict=True):
        if isinstance(env, Failure):
            ep.failure = env
        else:
            ep.system_prompt = system_prompt if system_prompt is not None else env.system_prompt
            if ep.system_prompt is not None and not isinstance(ep.system_prompt, str):
                ep.failure = Failure(INVALID, f"system_prompt is {type(ep.system_prompt).__name__}, not str")
    drops_reasoning = {  # refused here, before any environment runs, where the template cannot serve
        prompt: check_chat_template(tokenizer, prompt, template_kwargs)
        for prompt in dict.fromkeys(ep.system_prompt for ep in episodes if not ep.failed)
    }

    live = [i for i in range(B) if not episodes[i].failed]
    firsts = call_all([lambda i=i: envs[i].reset(episodes[i].row) for i in live], env_timeout, "reset")
    conversations: dict[int, Conversation] = {}
    for i, first in zip(live, firsts, strict=True):
        first = check_reset(first)
        if isinstance(first, Failure):
            episodes[i].failure = first
            continue
        episodes[i].first_message = first
        try:
            conversations[i] = Conversation(
                tokenizer, episodes[i].system_prompt, first, template_kwargs,
                drops_reasoning[episodes[i].system_prompt],
            )  # fmt: skip
        except Exception as exc:  # a template can refuse content (e.g. raise_exception in Jinja)
            episodes[i].failure = Failure(TEMPLATE, f"rendering the first message failed: {exc}")
    prompts = [conversations[i].prompt_ids() if i in conversations else [pad_id] for i in range(B)]

    # per episode: ids after the prompt, 1 where sampled, sampler log-probs and entropies
    ids: list[list[int]] = [[] for _ in range(B)]
    sampled: list[list[int]] = [[] for _ in range(B)]
    logps: list[list[float]] = [[] for _ in range(B)]
    entropies: list[list[float]] = [[] for _ in range(B)]
    if engine is None:
        decoder = _Decoder(model, pad_id, _drawer(temperature, top_p, greedy, generator))
    else:
        decoder = _EngineDecoder(engine, temperature, top_p, greedy, generator)
    rows_live = sorted(conversations)
    if rows_live:
        capacity = max(len(p) for p in prompts) + min(budget, max_turns * max_new_tokens) + 64
        decoder.prefill(rows_live, [prompts[i] for i in rows_live], capacity)
    for turn in range(max_turns):
        if not rows_live:
            break
        replies = decoder.turn([min(max_new_tokens, budget - len(ids[i])) for i in decoder.rows], stop)
        stepping = []
        for i, (reply, lp, h) in zip(decoder.rows, replies, strict=True):
            ep = episodes[i]
            ended = reply[-1] in stop
            ep.reply_ids.append(reply)
            ep.replies.append(tokenizer.decode(reply[:-1] if ended else reply, skip_special_tokens=True))
            ids[i] += reply
            sampled[i] += [1] * len(reply)
            logps[i] += lp
            entropies[i] += h
            if ended:
                stepping.append(i)
            else:
                ep.truncated = MAX_NEW_TOKENS if len(reply) == max_new_tokens else MAX_EPISODE_TOKENS
        results = call_all(
            [lambda i=i: envs[i].step(episodes[i].replies[-1]) for i in stepping], env_timeout, "step"
        )
        going_on: dict[int, list[int]] = {}
        for i, result in zip(stepping, results, strict=True):
            ep, result = episodes[i], check_step(result)
            if isinstance(result, Failure):
                ep.failure = result
                continue
            ep.observations.append(result.observation)
            ep.infos.append(result.info)
            if result.done:
                ep.done = True
            elif turn + 1 == max_turns:
                ep.truncated = MAX_TURNS
            else:
                try:
                    env_ids = conversations[i].environment_turn(
                        ep.replies[-1], ep.reply_ids[-1][-1], result.observation
                    )
                except Exception as exc:
                    ep.failure = Failure(TEMPLATE, f"turn {turn + 1}: {exc}")
                    continue
                if len(ids[i]) + len(env_ids) + 1 > budget:  # no room left for a reply
                    ep.truncated = MAX_EPISODE_TOKENS
                    continue
                ep.env_ids.append(env_ids)
                going_on[i] = env_ids
        keep = [r for r, i in enumerate(decoder.rows) if i in going_on]
        rows_live = [decoder.rows[r] for r in keep]
        if not rows_live:
            break
        decoder.keep(keep)
        # each row's stop token was sampled but never fed: it enters the cache ahead of the environment's ids
        decoder.append([[ids[i][-1], *going_on[i]] for i in rows_live])
        for i in rows_live:
            ids[i] += going_on[i]
            sampled[i] += [0] * len(going_on[i])
            logps[i] += [0.0] * len(going_on[i])
            entropies[i] += [0.0] * len(going_on[i])

    rollout = _rollout(prompts, ids, sampled, logps, entropies, episodes, pad_id, group_size, model.device)
    if engine is not None:
        engine.rest()
        rollout.entropy, rollout.sampler = None, engine.name
    return EpisodeBatch(rollout, episodes)


def _rollout(prompts, ids, sampled, logps, entropies, episodes, pad_id, group_size, device) -> Rollout:
    B, T = len(ids), max(1, max((len(s) for s in ids), default=1))
    completion = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    loss_mask = torch.zeros((B, T), dtype=torch.long)
    logprobs = torch.zeros((B, T), dtype=torch.float32)
    entropy = torch.zeros((B, T), dtype=torch.float32)
    for i, seq in enumerate(ids):
        n = len(seq)
        completion[i, :n] = torch.tensor(seq, dtype=torch.long)
        mask[i, :n] = 1
        loss_mask[i, :n] = torch.tensor(sampled[i], dtype=torch.long)
        logprobs[i, :n] = torch.tensor(logps[i], dtype=torch.float32)
        entropy[i, :n] = torch.tensor(entropies[i], dtype=torch.float32)
    prompt_ids, prompt_mask = left_pad(prompts, pad_id)
    return Rollout(
        prompt_ids=prompt_ids.to(device),
        prompt_mask=prompt_mask.to(device),
        completion_ids=completion.to(device),
        completion_mask=mask.to(device),
        logprobs=logprobs.to(device),
        truncated=torch.tensor([e.truncated is not None for e in episodes], dtype=torch.bool, device=device),
        group_size=group_size,
        entropy=entropy.to(device),
        loss_mask=loss_mask.to(device),
    )
