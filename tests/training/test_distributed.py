"""Data-parallel GRPO on the CPU with gloo, two processes: the gradient equals one process's on the same
batch, the ranks end with identical adapters, and a run stopped by Ctrl-C resumes exactly."""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from graft.batch import Rollout, ScoredBatch, select_groups
from graft.config import load_config
from graft.training.distributed import Ranks
from graft.training.grpo import minibatch_backward

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fixed_batch(vocab: int, groups: int = 4, G: int = 3) -> tuple[Rollout, torch.Tensor]:
    """A rollout whose completions have very different lengths, so the ranks' token counts differ: a
    normaliser taken per rank instead of over the step would show."""
    gen = torch.Generator().manual_seed(0)
    B, P, T = groups * G, 5, 9
    lengths = torch.tensor([1, 9, 2, 8, 3, 7, 9, 9, 9, 1, 1, 2])[:B]
    completion_mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    rollout = Rollout(
        prompt_ids=torch.randint(3, vocab, (B, P), generator=gen).repeat_interleave(1, 0),
        prompt_mask=torch.ones(B, P, dtype=torch.long),
        completion_ids=torch.randint(3, vocab, (B, T), generator=gen) * completion_mask,
        completion_mask=completion_mask,
        logprobs=torch.zeros(B, T),
        truncated=torch.zeros(B, dtype=torch.bool),
        group_size=G,
    )
    advantages = torch.randn(B, generator=gen)
    return rollout, advantages


def lora_policy(model_dir):
    from graft.config import LoraConfig, ModelConfig
    from graft.models import add_lora, load_model

    policy, _ = load_model(ModelConfig(name=str(model_dir), device="cpu"))
    policy = add_lora(policy, LoraConfig(r=4), seed=0)
    with torch.no_grad():  # B starts at zero: give every factor a gradient
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    return policy.train()


def step_gradients(model_dir, loss_type: str, ranks: Ranks) -> dict[str, torch.Tensor]:
    cfg = load_config(
        None, [f"grpo.loss_type={loss_type}", "train.micro_batch_size=2", "grpo.num_generations=3"]
    )
    policy = lora_policy(model_dir)
    rollout, advantages = fixed_batch(policy.config.vocab_size)
    groups = ranks.share(list(range(rollout.completion_ids.shape[0] // rollout.group_size)))
    mine = select_groups(rollout, groups)
    rows = torch.arange(groups[0] * 3, (groups[-1] + 1) * 3)
    batch = ScoredBatch(mine, advantages[rows] * 0, advantages[rows], None, None)
    minibatch_backward(policy, batch, torch.arange(len(rows)), cfg, torch.device("cpu"), None, ranks)
    params = [p for p in policy.parameters() if p.requires_grad]
    ranks.sum_gradients(params)
    return {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad}


def _rank_worker(rank: int, world: int, port: int, model_dir, loss_type: str, out) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        grads = step_gradients(model_dir, loss_type, Ranks(rank, world))
        torch.save(grads, f"{out}.{rank}")
        # both ranks done before either tears gloo down: a rank destroying its group while the other's
        # connection is still live aborted once in CI ("terminate called without an active exception")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_two_processes_give_the_gradient_of_one_on_the_same_batch(tiny_model_dir, tmp_path, loss_type):
    single = step_gradients(tiny_model_dir, loss_type, Ranks())
    out = tmp_path / "grads"
    mp.spawn(_rank_worker, args=(2, free_port(), tiny_model_dir, loss_type, str(out)), nprocs=2)
    for rank in range(2):
        grads = torch.load(f"{out}.{rank}")
        assert grads.keys() == single.keys()
        for name, g in single.items():
            # the same float32 products; only the order of the final sums differs (two partial sums
            # added instead of one running sum): relative error ~1e-6 at these magnitudes
            assert torch.allclose(grads[name], g, rtol=1e-5, atol=1e-7), (loss_type, name)
    assert sum(float(g.abs().sum()) for g in single.values()) > 0


def _digit_share(prompts, completions, **_):
    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]


REWARD_MODULE = """
from graft.text import completion_text

def digit_share(prompts, completions, **_):
    texts = [completion_text(c) for c in completions]
    return [sum(c.isdigit() for c in t) / max(len(t), 1) for t in texts]
"""


def run_args(model_dir, out_dir, name, reward_file, *overrides) -> list[str]:
    return [
        f"model.name={model_dir}",
        f"rewards.functions=[{reward_file}:digit_share]",
        "task.num_train=16",
        "task.num_eval=4",
        "grpo.num_generations=3",
        "generation.max_new_tokens=6",
        "train.prompts_per_step=4",
        "train.learning_rate=0.01",
        "train.deterministic=true",
        "checkpoint.every_n_steps=1",
        "checkpoint.keep_last_n=10",
        f"logging.output_dir={out_dir}",
        f"logging.run_name={name}",
        "logging.progress=lines",
        "logging.print_config=false",
        "gate.enabled=false",
        *overrides,
    ]


def graft_train(args: list[str], nproc: int = 2, **popen) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "graft", "train", f"--nproc={nproc}", *args]
    return subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen
    )


def adapter(run_dir):
    return load_file(run_dir / "final" / "adapter_model.safetensors")


def test_two_processes_train_resume_after_ctrl_c_and_end_like_a_straight_run(tiny_model_dir, tmp_path):
    reward = tmp_path / "reward.py"
    reward.write_text(REWARD_MODULE)
    straight = graft_train(run_args(tiny_model_dir, tmp_path, "straight", reward, "train.max_steps=6"))
    out, _ = straight.communicate(timeout=300)
    assert straight.returncode == 0, out
    run = tmp_path / "straight"
    state = torch.load(run / "checkpoints" / "step-000003" / "trainer_state.pt", weights_only=False)
    sums = state["trainer_state"]["rank_weight_sums"]
    assert len(sums) == 2 and sums[0] == sums[1]  # both ranks hold the same adapter
    assert len(state["trainer_state"]["rank_rng"]) == 2  # and each its own random state
    rows = [json.loads(line) for line in (run / "completions.jsonl").read_text().splitlines()]
    assert len(rows) == 6 * 4 * 3  # every rank's completions, written once

    # Ctrl-C in the terminal reaches the launcher, which passes one SIGINT on: the step ends, a checkpoint
    interrupted = graft_train(run_args(tiny_model_dir, tmp_path, "resumed", reward, "train.max_steps=400"))
    lines = []
    for line in interrupted.stdout:
        lines.append(line)
        if line.startswith("step 2/"):
            interrupted.send_signal(signal.SIGINT)
            break
    out = "".join(lines) + interrupted.communicate(timeout=300)[0]
    assert interrupted.returncode == 130, out
    assert "resume with:" in out
    stopped = int((tmp_path / "resumed" / "checkpoints" / "latest").read_text().strip().split("-")[1])
    assert stopped >= 2
    if stopped >= 6:
        pytest.skip("the run reached step 6 before the signal arrived (a very fast machine)")
    resumed = graft_train(
        run_args(tiny_model_dir, tmp_path, "resumed", reward, "train.max_steps=6", "resume=auto")
    )
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    a, b = adapter(run), adapter(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_data_parallel_settings_that_cannot_split_are_refused_before_loading(tiny_model_dir):
    from graft.validate import data_parallel_problems

    cfg = load_config(
        None,
        ["train.prompts_per_step=3", "grpo.dynamic_sampling=true", "sft.enabled=true", "train.skip_solved=2"],
    )
    problems = " ".join(data_parallel_problems(cfg, 2))
    assert "multiple of 2" in problems and "dynamic_sampling" in problems and "graft sft" in problems
    assert "'train.skip_solved'" in problems
    assert data_parallel_problems(cfg, 1) == []
