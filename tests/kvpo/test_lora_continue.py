"""``lora_ckpt`` with ``lora_init: continue`` (the KVPO authors' trainer): the loaded LoRA is the
trainable adapter, the KL reference is a frozen copy of the initial model with that LoRA, the EMA
starts at it; checkpoints carry the reference and resume exactly. Oracles: the LoRA file's own
tensors and a plain base model with ``W + B @ A * alpha / rank`` written into its weights."""

import dataclasses

import pytest
import torch

from kvpo.models.lora import active_adapter, adapters, add_lora, lora_parameters, lora_state_dict
from kvpo.training.checkpoint import capture_rng, load_checkpoint, restore_rng
from kvpo.training.distributed import DistInfo
from kvpo.training.state import load_state, save_state
from kvpo.training.trainer import build_learner
from tests.kvpo.trainer_fixtures import tiny_config, tiny_generator_dir

RANK, ALPHA = 4, 8.0
PROMPT = "a red circle moves left"


@pytest.fixture
def lora_run(tmp_path):
    """Tiny weights and a LoRA file in LongLive's layout (``generator_lora``, peft keys,
    non-zero A and B); returns ``(weights, path, {module.lora_X.weight: tensor})``."""
    from kvpo.toy.model import load_toy_model

    weights = tiny_generator_dir(tmp_path / "weights")
    model = load_toy_model(weights)
    add_lora(model.wan, RANK, ALPHA)
    g = torch.Generator().manual_seed(5)
    lora = {
        k: 0.3 * torch.randn(v.shape, generator=g) for k, v in lora_state_dict(model.wan).items()
    }
    path = tmp_path / "lora.pt"
    torch.save({"generator_lora": {f"base_model.model.{k}": v for k, v in lora.items()}}, path)
    return weights, path, lora


def _config(weights, tmp_path, path, *extra):
    return tiny_config(
        weights, tmp_path, f"lora_ckpt={path}", f"lora_ckpt_alpha={ALPHA}",
        f"adapter.alpha={ALPHA}", "ema_decay=0.9", *extra,
    )  # fmt: skip


def _file_name(param_name: str) -> str:
    """``blocks.0.attn1.to_q.lora_A.<adapter>.weight`` -> ``blocks.0.attn1.to_q.lora_A.weight``."""
    head, adapter_and_weight = param_name.split(".lora_", 1)
    ab, _, rest = adapter_and_weight.partition(".")
    return f"{head}.lora_{ab}.{rest.rsplit('.', 1)[-1]}"


def _merged_model(weights, lora):
    """The base model with ``W += B @ A * alpha / rank`` (fp64 product), no adapters."""
    from kvpo.toy.model import load_toy_model

    model = load_toy_model(weights)
    modules = dict(model.wan.transformer.named_modules())
    with torch.no_grad():
        for key, a in lora.items():
            if ".lora_A." not in key:
                continue
            b = lora[key.replace(".lora_A.", ".lora_B.")]
            linear = modules[key.split(".lora_A.")[0]]
            linear.weight += (b.double() @ a.double() * ALPHA / RANK).to(linear.weight.dtype)
    return model


def _output(learner_or_model, x, adapter=None):
    video = getattr(learner_or_model, "video_model", learner_or_model)
    with torch.no_grad():
        if adapter is None:
            return video.wan(x, 500.0, video.encode([PROMPT]), 0)
        with active_adapter(video.wan, adapter):
            return video.wan(x, 500.0, video.encode([PROMPT]), 0)


def test_trainable_parameters_are_the_loaded_lora_and_the_reference_stays(lora_run, tmp_path):
    weights, path, lora = lora_run
    learner = build_learner(_config(weights, tmp_path, path), DistInfo())
    model = learner.model
    assert adapters(model) == ["default", "ref", "old"] and learner.kl_reference == "ref"
    config = model.transformer.peft_config["default"]
    assert (config.r, config.lora_alpha) == (RANK, ALPHA)
    named = learner.named_params
    assert {_file_name(k) for k in named} == set(lora) and len(named) == len(lora)
    for name, param in named.items():
        assert torch.equal(param.detach(), lora[_file_name(name)]), name
    trainable = {n for n, p in model.transformer.named_parameters() if p.requires_grad}
    assert trainable == set(named)
    assert [id(p) for p in learner.optimizer.param_groups[0]["params"]] == [
        id(p) for p in named.values()
    ]
    assert all(torch.equal(learner.ema.shadow[k], lora[_file_name(k)]) for k in named)

    x = torch.randn(1, 3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    learner.train_step(0)  # one update
    new = {k: p.detach().clone() for k, p in named.items()}
    assert any(not torch.equal(new[k], lora[_file_name(k)]) for k in named)
    for k in named:  # EMA: 0.9 * the loaded LoRA + 0.1 * the updated weights
        expected = 0.9 * lora[_file_name(k)].double() + 0.1 * new[k].double()
        torch.testing.assert_close(learner.ema.shadow[k].double(), expected, rtol=1e-6, atol=1e-7)

    oracle = _merged_model(weights, lora)
    expected = _output(oracle, x)
    torch.testing.assert_close(_output(learner, x, "ref"), expected, rtol=1e-5, atol=1e-5)
    for p in lora_parameters(model, "ref").values():
        assert not p.requires_grad
    assert (_output(learner, x, "default") - expected).abs().max() > 1e-5  # the policy moved
    from kvpo.toy.model import load_toy_model

    base = _output(load_toy_model(weights), x)
    assert (expected - base).abs().max() > 1e-3  # the LoRA matters


def test_rank_and_alpha_must_describe_the_loaded_lora(lora_run, tmp_path):
    weights, path, _ = lora_run
    for extra, got in ((("adapter.rank=8",), "adapter.rank = 8"), (("adapter.alpha=4",), "= 4;")):
        cfg = _config(weights, tmp_path, path, *extra)
        with pytest.raises(ValueError, match="lora_init=continue trains lora_ckpt itself") as err:
            build_learner(cfg, DistInfo())
        assert "rank 4 and alpha 8" in str(err.value) and got in str(err.value)


def test_merge_option_trains_a_fresh_adapter_on_the_merged_base(lora_run, tmp_path):
    weights, path, lora = lora_run
    learner = build_learner(_config(weights, tmp_path, path, "lora_init=merge"), DistInfo())
    assert adapters(learner.model) == ["default", "old"] and learner.kl_reference is None
    assert all(
        not p.any() for k, p in learner.named_params.items() if ".lora_B." in k
    )  # B = 0: the function starts at the merged model
    x = torch.randn(1, 3, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(
        _output(learner, x, "default"), _output(_merged_model(weights, lora), x),
        rtol=1e-5, atol=1e-5,
    )  # fmt: skip


def test_resume_restores_the_reference_exactly(lora_run, tmp_path):
    """A checkpoint inside a sync period (sync_every = 2) written by a continuing run, loaded
    into a fresh learner whose adapters were disturbed, continues exactly (losses, the three
    adapters, EMA, AdamW) through the sync; the checkpoint holds the loaded LoRA as ``ref``."""
    weights, path, lora = lora_run
    cfg = _config(weights, tmp_path, path, "sync_every=2")
    first = build_learner(cfg, DistInfo())
    first.train_step(0)
    save_state(first, tmp_path / "run", capture_rng())
    saved = load_checkpoint(tmp_path / "run")
    assert {_file_name(k) for k in saved.reference} == set(lora)
    assert all(torch.equal(v, lora[_file_name(k)]) for k, v in saved.reference.items())

    second = build_learner(cfg, DistInfo())
    with torch.no_grad():
        for adapter in ("default", "ref", "old"):
            for p in lora_parameters(second.model, adapter).values():
                p.mul_(0.5)
    load_state(second, tmp_path / "run")
    rng = capture_rng()
    runs = []
    for learner in (first, second):
        restore_rng(rng)
        records = [learner.train_step(rollout) for rollout in (1, 2)]
        state = {
            a: {k: v.detach().clone() for k, v in lora_parameters(learner.model, a).items()}
            for a in ("default", "ref", "old")
        }
        state["ema"] = dict(learner.ema.shadow)
        runs.append((records, state, learner.optimizer.state_dict(), learner.counters))
    (rec_a, a, opt_a, count_a), (rec_b, b, opt_b, count_b) = runs
    assert [r["loss"] for r in rec_a] == [r["loss"] for r in rec_b]
    assert [r["energy/ref"].tolist() for r in rec_a] == [r["energy/ref"].tolist() for r in rec_b]
    assert dataclasses.asdict(count_a) == dataclasses.asdict(count_b)
    for key in a:
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    for pid, entries in opt_a["state"].items():
        for name, value in entries.items():
            assert torch.equal(value, opt_b["state"][pid][name])
    assert all(torch.equal(v, lora[_file_name(k)]) for k, v in a["ref"].items())

    merged = build_learner(_config(weights, tmp_path, path, "lora_init=merge"), DistInfo())
    with pytest.raises(ValueError, match="holds an initial LoRA"):
        load_state(merged, tmp_path / "run")


def test_try_kl_in_a_training_step(lora_run, tmp_path):
    """``kl_loss_mode: try_kl``: D = 0 while the policy is the initial LoRA, > 0 after an update;
    the step's loss is ``s * (policy term + kl_coef * D)`` and no discrete KL enters it."""
    weights, path, _ = lora_run
    cfg = _config(weights, tmp_path, path, "kl_loss_mode=try_kl", "anchor_grad_steps=2")
    learner = build_learner(cfg, DistInfo())
    assert learner.policy_config.kl_coef == 0.0 and learner.anchor_kl.grad_steps == 2
    first, second = learner.train_step(0), learner.train_step(1)
    assert first["policy/anchor_mse"] == 0.0 and second["policy/anchor_mse"] > 0
    for rec in (first, second):
        s = rec["policy/scale"]
        expected = s * rec["policy/policy_loss"] + s * 10.0 * rec["policy/anchor_mse"]
        assert rec["loss"] == pytest.approx(expected, rel=1e-5, abs=1e-9)


def test_memory_plan_counts_the_initial_copy():
    """A continuing run keeps a third LoRA copy (the frozen initial ``ref``): at rank 256 on
    Wan-1.3B in bf16, 349,962,240 x 2 bytes more resident than merging or an old-policy KL."""
    from kvpo.models.config import WAN_1_3B
    from kvpo.planning import plan_memory
    from kvpo.planning.phases import Setup
    from kvpo.training.config_parse import load_config

    setup = Setup(WAN_1_3B, "bfloat16", "cuda", True, 512, "Wan2.1-T2V-1.3B")
    resident = {
        extra: plan_memory(load_config("configs/longlive.yaml", [extra]), setup, 1).resident_bytes
        for extra in ("lora_init=continue", "lora_init=merge", "kl_reference_initial=false")
    }
    assert resident["lora_init=continue"] - resident["lora_init=merge"] == 349_962_240 * 2
    assert resident["kl_reference_initial=false"] == resident["lora_init=merge"]


def test_try_kl_micro_batched_and_checkpointed_give_the_same_gradient(lora_run, tmp_path):
    """With the policy moved off the initial LoRA (so D > 0), row_micro_batch=2 and gradient
    checkpointing give the same loss and gradient, the anchor penalty included, as all rows at
    once."""
    from kvpo.training.phases import PhaseTimer

    weights, path, _ = lora_run
    grads, records = [], []
    for micro, ckpt in ((0, "false"), (2, "false"), (0, "true")):
        cfg = _config(
            weights, tmp_path, path, "kl_loss_mode=try_kl", "anchor_grad_steps=2",
            f"row_micro_batch={micro}", f"gradient_checkpointing={ckpt}",
        )  # fmt: skip
        torch.manual_seed(5)
        learner = build_learner(cfg, DistInfo())
        g = torch.Generator().manual_seed(9)
        with torch.no_grad():
            for p in learner.named_params.values():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        learner.optimizer.zero_grad(set_to_none=True)
        records.append(learner.group_gradients(1, PhaseTimer()))
        grads.append({k: p.grad.clone() for k, p in learner.named_params.items()})
    assert records[0]["policy/anchor_mse"] > 0
    for other in (1, 2):
        for key in ("loss", "policy/anchor_mse"):
            assert records[other][key] == pytest.approx(records[0][key], rel=1e-5), key
        for name in grads[0]:
            torch.testing.assert_close(grads[other][name], grads[0][name], rtol=1e-4, atol=1e-9)
