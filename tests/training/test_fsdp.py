"""Full fine-tuning sharded over two CPU processes (train.fsdp, gloo): the sharded gradient is the
single-process gradient of the same batch, the weights gathered for sampling are the model's, a sharded
run ends where the replicated data-parallel run does, resumes exactly, and its checkpoints load in
transformers; configurations it cannot shard are refused before loading."""

import os

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from test_distributed import REWARD_MODULE, fixed_batch, free_port, graft_train, run_args

from graft.batch import ScoredBatch, select_groups
from graft.config import load_config
from graft.training.distributed import Ranks, full_tensor
from graft.training.grpo import minibatch_backward

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def full_policy(model_dir):
    from graft.config import ModelConfig
    from graft.models import load_model

    policy, _ = load_model(ModelConfig(name=str(model_dir), device="cpu"))
    return policy.train()


def step_gradients(policy, loss_type: str, ranks: Ranks) -> dict[str, torch.Tensor]:
    """Every trained parameter's gradient after this rank's share of the fixed batch (full tensors)."""
    cfg = load_config(
        None, [f"grpo.loss_type={loss_type}", "train.micro_batch_size=2", "grpo.num_generations=3"]
    )
    rollout, advantages = fixed_batch(policy.config.vocab_size)
    groups = ranks.share(list(range(rollout.completion_ids.shape[0] // rollout.group_size)))
    rows = torch.arange(groups[0] * 3, (groups[-1] + 1) * 3)
    batch = ScoredBatch(select_groups(rollout, groups), advantages[rows] * 0, advantages[rows], None, None)
    minibatch_backward(policy, batch, torch.arange(len(rows)), cfg, torch.device("cpu"), None, ranks)
    return {n: full_tensor(p.grad).clone() for n, p in policy.named_parameters() if p.requires_grad}


def _rank_worker(rank: int, world: int, port: int, model_dir, loss_type: str, out) -> None:
    import torch.distributed as dist

    from graft.training.fsdp import full_weights, is_sharded, shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ranks = Ranks(rank, world)
        policy = shard(full_policy(model_dir), ranks)
        assert is_sharded(policy)
        rows = next(policy.parameters()).shape[0]  # the embedding's, split by rows (the first a row more)
        assert next(policy.parameters()).to_local().shape[0] == (rows + 1 - rank) // 2
        grads = step_gradients(policy, loss_type, ranks)
        # gathered for sampling, nested as the gate nests a rollout in its evaluation: the main rank
        # alone runs a forward (no collective), the other waits; then both hold their shards again
        ids = torch.tensor([[5, 6, 7, 8]])
        with full_weights(policy), full_weights(policy):
            if ranks.main:
                with torch.no_grad():
                    grads["logits"] = policy(input_ids=ids).logits
            dist.barrier()
        assert type(next(policy.parameters())).__name__ == "DTensor"
        if ranks.main:
            torch.save(grads, out)
        dist.barrier()  # both ranks done before either tears gloo down
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("loss_type", ["dapo", "dr_grpo"])
def test_sharded_gradients_equal_one_process_on_the_same_batch(tiny_model_dir, tmp_path, loss_type):
    policy = full_policy(tiny_model_dir)
    single = step_gradients(policy, loss_type, Ranks())
    with torch.no_grad():
        logits = policy(input_ids=torch.tensor([[5, 6, 7, 8]])).logits
    out = tmp_path / "grads"
    mp.spawn(_rank_worker, args=(2, free_port(), tiny_model_dir, loss_type, str(out)), nprocs=2)
    sharded = torch.load(out)
    assert torch.equal(sharded.pop("logits"), logits)  # the gathered weights are the model's, bit for bit
    assert sharded.keys() == single.keys() and len(single) > 10  # every weight of the model is trained
    for name, g in single.items():
        # the same float32 pass on the same weights; each rank's half of the groups, and two partial
        # sums added where one process sums once: a few ulps (measured here: at most 1.5e-8 on
        # gradients up to 0.14)
        assert torch.allclose(sharded[name], g, rtol=1e-5, atol=1e-7), (loss_type, name)
    assert sum(float(g.abs().sum()) for g in single.values()) > 0


def full_weights_of(run_dir, folder: str = "final") -> dict[str, torch.Tensor]:
    return load_file(run_dir / folder / "model.safetensors")


FULL = ["lora.enabled=false", "generation.pack_weights=false", "train.max_grad_norm=0.05"]


def test_sharded_run_matches_the_replicated_run_resumes_exactly_and_loads(tiny_model_dir, tmp_path):
    reward = tmp_path / "reward.py"
    reward.write_text(REWARD_MODULE)

    def run(name: str, *overrides: str) -> None:
        proc = graft_train(run_args(tiny_model_dir, tmp_path, name, reward, *FULL, *overrides))
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out

    run("sharded", "train.fsdp=true", "train.max_steps=3")
    run("replicated", "train.max_steps=3")
    sharded, replicated = full_weights_of(tmp_path / "sharded"), full_weights_of(tmp_path / "replicated")
    start = load_file(tiny_model_dir / "model.safetensors")
    assert sharded.keys() == replicated.keys() == start.keys()  # the tied head written once, as HF does
    assert max(float((sharded[k] - start[k]).abs().max()) for k in start) > 1e-3  # it trained
    for k in start:
        # the same samples and float32 updates; the gradients' sums run in another order (see the
        # gradient test), and clipping (max_grad_norm 0.05, active every step) takes a norm over shards
        # instead of whole tensors: three Adam steps of lr 0.01 keep the weights within a few 1e-7
        assert torch.allclose(sharded[k], replicated[k], rtol=1e-5, atol=1e-6), k

    state = torch.load(
        tmp_path / "sharded" / "checkpoints" / "step-000002" / "trainer_state.pt", weights_only=False
    )
    names = set(state["optimizer"]["state"])
    assert "model.embed_tokens.weight" in names and len(names) == len(start)  # keyed by name, whole
    assert len(state["trainer_state"]["rank_rng"]) == 2
    assert "rank_weight_sums" not in state["trainer_state"]  # shards differ by design

    # stopped after step 2 (its final checkpoint), resumed to step 3: the straight run's weights exactly
    run("resumed", "train.fsdp=true", "train.max_steps=2")
    run("resumed", "train.fsdp=true", "train.max_steps=3", "resume=auto")
    resumed = full_weights_of(tmp_path / "resumed")
    assert all(torch.equal(resumed[k], sharded[k]) for k in sharded)

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded" / "final")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert torch.equal(model.lm_head.weight, sharded["model.embed_tokens.weight"])  # still tied


def test_what_cannot_be_sharded_is_refused_before_loading(tmp_path):
    from graft.config import ConfigError
    from graft.validate import fsdp_problems, plan_for_gpu

    lora = load_config(None, ["train.fsdp=true", "model.quantization=4bit"])
    problems = " ".join(fsdp_problems(lora, 1))
    assert "--nproc" in problems and "lora.enabled=false" in problems and "quantization" in problems
    episodes = load_config(None, ["train.fsdp=true", "lora.enabled=false", "task.name=wordle"])
    assert "multi-turn" in " ".join(fsdp_problems(episodes, 2))
    full = load_config(None, ["train.fsdp=true", "lora.enabled=false"])
    assert fsdp_problems(full, 2) == [] and fsdp_problems(load_config(None, []), 1) == []
    with pytest.raises(ConfigError, match="--nproc"):
        plan_for_gpu(full, 80)


def test_sharding_divides_the_training_state_by_the_processes_in_the_estimate(tiny_model_dir):
    from graft.validate import plan_for_gpu

    full = [f"model.name={tiny_model_dir}", "lora.enabled=false", "train.prompts_per_step=4"]
    one, _ = plan_for_gpu(load_config(None, full), 80)
    four, verdict = plan_for_gpu(load_config(None, [*full, "train.fsdp=true"]), 80, world=4)
    assert four.parts["grads + Adam"] == one.parts["grads + Adam"] // 4
    assert four.parts["weights"] == one.parts["weights"] // 4
    assert four.parts["gathered weights"] == one.parts["weights"]  # the whole model, to sample
    assert four.parts["rollout KV + logits"] == one.parts["rollout KV + logits"] // 4  # its share
    assert "per GPU of 4 (train.fsdp: sharded)" in verdict


def test_a_run_cannot_switch_sharding_on_resume_and_vllm_is_not_chosen_for_it(tmp_path):
    from graft.checks.resume import resume_problems
    from graft.rollout.backends import vllm_problem

    sharded = load_config(None, ["train.fsdp=true", "lora.enabled=false"])
    (tmp_path / "config.yaml").write_text(sharded.to_yaml())
    problems, _ = resume_problems(load_config(None, ["lora.enabled=false"]), tmp_path, 2)
    assert "train.fsdp: True -> False" in " ".join(problems) and "optimizer state" in " ".join(problems)
    assert "train.fsdp" in vllm_problem(sharded, "cuda")


def test_full_weights_are_read_from_save_pretrained_shards(tiny_model_dir, tmp_path):
    from graft.training.checkpoint import read_weights

    model = full_policy(tiny_model_dir)
    model.save_pretrained(tmp_path, max_shard_size="20KB")  # several files and their index
    assert (tmp_path / "model.safetensors.index.json").is_file()
    weights, whole = read_weights(tmp_path), read_weights(tiny_model_dir)
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    assert weights.keys() == whole.keys() and all(torch.equal(weights[k], whole[k]) for k in whole)


def test_validate_checks_a_recipe_for_n_processes(tiny_model_dir, capsys):
    from graft.cli import main

    args = [
        f"model.name={tiny_model_dir}",
        "lora.enabled=false",
        "train.fsdp=true",
        "train.prompts_per_step=4",
    ]
    assert main(["validate", *args, "--nproc", "4", "--gpu-memory", "80"]) == 0
    assert "per GPU of 4 (train.fsdp: sharded)" in capsys.readouterr().out
    assert main(["validate", *args]) != 0  # one process cannot shard
    refused = capsys.readouterr()
    assert "train.fsdp" in refused.out + refused.err and "--nproc" in refused.out + refused.err
