"""``python -m kvpo.train`` end to end on random tiny weights (independent of the shipped model)."""

import json

import pytest
import torch
import yaml
from PIL import Image

from kvpo.rewards.registry import register_reward
from kvpo.train import main
from kvpo.training.config import ConfigError
from kvpo.training.config_parse import load_config
from tests.kvpo.trainer_fixtures import tiny_args, tiny_generator_dir


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return tiny_generator_dir(tmp_path_factory.mktemp("tiny_generator"))


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_help_explains_every_key(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    for text in ("--config", "--resume", "key=value", "K (int, default 8)", "adapter.rank (int"):
        assert text in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generator_ckpt=/no/such/dir"], "checkpoint path '/no/such/dir' does not exist"),
        (["perturb_num_blcks=2"], "did you mean 'perturb_num_blocks'?"),
        (["slice_last_frames=0"], "routing cannot fit the resident cache"),
        (["--resume", "/no/such/run"], "--resume: no checkpoint at '/no/such/run'"),
    ],
)
def test_bad_input_fails_before_work(tmp_path, capsys, args, message):
    assert main([*args, f"output_dir={tmp_path / 'runs'}"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_bad_prompt_file(tmp_path, capsys):
    (tmp_path / "prompts.jsonl").write_text('{"prompts": "a red circle moves left"}\n')
    assert main([f"data_path={tmp_path / 'prompts.jsonl'}"]) == 2
    assert '"prompts" must be a list of strings' in capsys.readouterr().err


def test_end_to_end(weights, tmp_path, capsys):
    args = tiny_args(
        weights, tmp_path, "run_name=r", "max_train_steps=3", "sample_interval_steps=3"
    )
    assert main(args) == 0
    run = tmp_path / "r"
    out = capsys.readouterr().out
    assert "held-out rewards" in out and "total" in out
    # the resolved config is saved and reloads to the same config
    saved = load_config(run / "config.yaml")
    assert saved == load_config(None, args) and yaml.safe_load((run / "config.yaml").read_text())
    records = _metrics(run)
    assert [r["step"] for r in records] == [0, 1, 2]
    # old policy synced every 2 updates: steps 0 and 2 are first after a sync, ratio exactly 1
    for r in records:
        assert r["sync/first_update_after_sync"] == (r["step"] in (0, 2))
        if r["step"] in (0, 2):
            assert r["sync/ratio_exactly_one"] is True and r["sync/max_abs_log_ratio"] == 0.0
    assert records[1]["sync/max_abs_log_ratio"] > 0  # the policy moved after step 0
    for key in ("reward_local/text_alignment/branches", "advantage/final", "grad_norm", "lr",
                "time/rollout", "time/replay_grad", "kv_bytes/window", "peak_memory_bytes",
                "policy/clip_fraction", "routing/plan"):  # fmt: skip
        assert key in records[0], key
    assert len(records[0]["reward_local/text_alignment/branches"]) == 3
    summary = json.loads((run / "summary.json").read_text())
    assert [s["name"] for s in summary["heldout"]][-1] == "total" and summary["steps"] == 3
    assert Image.open(run / "reward_curve.png").size == (720, 400)
    gif = Image.open(run / "samples" / "step00003.gif")
    assert gif.n_frames == 12
    # the exported adapter loads with peft and holds the trained weights
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file

    from kvpo.toy.model import load_toy_model
    from kvpo.training.checkpoint import load_checkpoint

    base = load_toy_model(weights).wan.transformer
    peft_model = PeftModel.from_pretrained(base, str(run / "adapter"))
    loaded = get_peft_model_state_dict(peft_model)
    exported = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert set(loaded) == {k.removeprefix("base_model.model.") for k in exported} or set(
        loaded
    ) == set(exported)
    policy = load_checkpoint(run).policy
    b_name = next(k for k in policy if "lora_B" in k)
    assert policy[b_name].abs().sum() > 0  # training moved the adapter away from B = 0
    peft_name = next(k for k in loaded if k.endswith(b_name.replace(".default", "")))
    assert torch.equal(loaded[peft_name], policy[b_name])


class _FlakyReward:
    """The toy reward, NaN on the first ``bad_calls`` calls (or always)."""

    names = ("text_alignment", "motion_quality", "visual_quality")

    def __init__(self, bad_calls: int = 10**9):
        from kvpo.toy.rewards import ToyReward

        self.inner, self.left = ToyReward(), bad_calls

    def __call__(self, videos, prompts, metadata=None):
        out = self.inner(videos, prompts, metadata)
        if self.left > 0:
            self.left -= 1
            out = {k: v * float("nan") for k, v in out.items()}
        return out


register_reward("test_nan_first_step")(lambda: _FlakyReward(bad_calls=2))
register_reward("test_nan_always")(_FlakyReward)


def test_nan_step_is_skipped_and_training_continues(weights, tmp_path):
    args = tiny_args(weights, tmp_path, "run_name=n", "reward_model=test_nan_first_step",
                     "eval_before=false", "eval_after=false")  # fmt: skip
    assert main(args) == 0
    records = _metrics(tmp_path / "n")
    assert "non-finite reward" in records[0]["skipped"]
    assert "loss" in records[1] and "skipped" not in records[1]


def test_repeated_skips_stop_the_run(weights, tmp_path):
    args = tiny_args(weights, tmp_path, "run_name=s", "reward_model=test_nan_always",
                     "eval_before=false", "eval_after=false", "max_consecutive_skips=2",
                     "max_train_steps=5")  # fmt: skip
    with pytest.raises(RuntimeError, match="2 consecutive steps skipped"):
        main(args)


def test_micro_batched_step_matches_full_batch(weights, tmp_path):
    """row_micro_batch=2 (rollout, replays and evaluation in micro-batches; the current policy's
    replay in two passes: dL/dE, then each micro-batch's share) and gradient checkpointing give
    the gradient of all rows at once."""
    from kvpo.training.distributed import DistInfo
    from kvpo.training.metrics import PhaseTimer
    from kvpo.training.trainer import build_learner
    from tests.kvpo.trainer_fixtures import tiny_config

    grads, records = [], []
    for micro, ckpt in ((0, "false"), (2, "false"), (0, "true")):
        cfg = tiny_config(
            weights, tmp_path, f"row_micro_batch={micro}", f"gradient_checkpointing={ckpt}"
        )
        torch.manual_seed(5)
        trainer = build_learner(cfg, DistInfo())
        trainer.optimizer.zero_grad(set_to_none=True)
        records.append(trainer.group_gradients(1, PhaseTimer()))
        grads.append({k: p.grad.clone() for k, p in trainer.named_params.items()})
        assert trainer.rows_per_batch == (4 if micro == 0 else 2)
    assert any(g.abs().sum() > 0 for g in grads[0].values())
    for other in (1, 2):  # micro-batched; gradient checkpointing
        assert records[0]["loss"] == pytest.approx(records[other]["loss"], rel=1e-5)
        torch.testing.assert_close(
            torch.tensor(records[0]["energy/current"]),
            torch.tensor(records[other]["energy/current"]),
        )
        for name in grads[0]:
            torch.testing.assert_close(grads[other][name], grads[0][name], rtol=1e-4, atol=1e-9)


def test_update_moves_probability_toward_positive_advantages(weights, tmp_path):
    """Wiring and sign, end to end: after one update on a group with given advantages, the
    replayed branch policy puts more log-probability on the positive-advantage branches."""
    from kvpo.method.policy import branch_log_probs
    from kvpo.training.distributed import DistInfo
    from kvpo.training.learner import GroupData
    from kvpo.training.metrics import PhaseTimer
    from kvpo.training.trainer import build_learner
    from tests.kvpo.trainer_fixtures import tiny_config

    cfg = tiny_config(weights, tmp_path, "kl_coef=0", "lr=1e-4", "lr_warmup_steps=1")
    trainer = build_learner(cfg, DistInfo())
    prompts = trainer.prompts.train(0, 0)
    ro = trainer.rollout(0, prompts, 0)
    adv = torch.tensor([1.0, -1.0, 0.5])
    with torch.no_grad():
        before = trainer.energies(ro, prompts, [0, 1, 2], "default")
        old = trainer.energies(ro, prompts, [0, 1, 2], "old")
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.policy_gradients(GroupData(ro, prompts, adv, True, old, old, {}), PhaseTimer())
    trainer.apply_update(PhaseTimer())
    with torch.no_grad():
        after = trainer.energies(ro, prompts, [0, 1, 2], "default")
    trainer.cache.free([ro.snapshot])
    gain = (adv * (branch_log_probs(after, cfg.tau) - branch_log_probs(before, cfg.tau))).sum()
    assert gain > 0, (before, after)
    # the energy of the best branch fell relative to the worst one's
    assert (after[0] - after[1]) < (before[0] - before[1])


class _FakeTextEncoder:
    """Stands in for umT5 (no weights here): a fixed random embedding per word."""

    def __init__(self, path, dtype=torch.float32, device="cpu"):
        self.table = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))

    def encode(self, prompts):
        ids = [[sum(map(ord, w)) % 64 for w in p.split()][:8] for p in prompts]
        out = torch.zeros(len(prompts), 8, 16)
        for i, row in enumerate(ids):
            out[i, : len(row)] = self.table[row]
        return out


class _FakeVAE:
    """Stands in for the Wan VAE: latent frame 0 -> 1 video frame, later ones -> 4 each."""

    def __init__(self, path, dtype=torch.float32, device="cpu"):
        pass

    def decode(self, latents):  # [1, 16, T, 60, 104] -> [1, 3, 4T - 3, 16, 16] in [-1, 1]
        x = torch.nn.functional.adaptive_avg_pool3d(latents[:, :3].float(), (None, 16, 16))
        return torch.cat([x[:, :, :1], x[:, :, 1:].repeat_interleave(4, dim=2)], 2).tanh()


def test_wan_checkpoint_path(tmp_path, monkeypatch):
    """A Wan-format checkpoint (diffusers naming, Wan latent size) with the encoder wrappers:
    rewards and held-out scores are computed on the decoded frames (4 per latent frame)."""
    from safetensors.torch import save_file

    from kvpo.models import CausalWan, WanConfig, encoders
    from kvpo.rewards.clips import VideoLayout
    from kvpo.training.distributed import DistInfo
    from kvpo.training.trainer import build_learner
    from kvpo.training.validation import validate
    from kvpo.video_model import load_video_model
    from tests.kvpo.trainer_fixtures import tiny_config

    monkeypatch.setattr(encoders, "WanTextEncoder", _FakeTextEncoder)
    monkeypatch.setattr(encoders, "WanVAE", _FakeVAE)
    torch.manual_seed(0)
    shape = WanConfig(patch_size=(1, 4, 4), num_attention_heads=1, text_dim=16, freq_dim=32,
                      ffn_dim=64, num_layers=1)  # fmt: skip
    wan = CausalWan.from_config(shape)
    with torch.no_grad():
        wan.transformer.proj_out.weight.normal_(std=0.2)
    save_file({k: v.contiguous() for k, v in wan.transformer.state_dict().items()},
              str(tmp_path / "wan.safetensors"))  # fmt: skip
    (tmp_path / "wan2.1").mkdir()
    (tmp_path / "prompts.txt").write_text(
        "a red circle moves left | a blue circle moves up\n"
        "a green square moves down | a green square moves left\n"
        "a cyan triangle moves right | a cyan triangle moves up\n"
    )
    data = f"data_path={tmp_path / 'prompts.txt'}"
    ckpt = tmp_path / "wan.safetensors"
    cfg = tiny_config(ckpt, tmp_path, f"wan_model_path={tmp_path / 'wan2.1'}", data, "K=2",
                      "eval_prompts=1")  # fmt: skip
    validate(cfg)
    with pytest.raises(ConfigError, match="wan_model_path must name a local Wan2.1 directory"):
        validate(tiny_config(ckpt, tmp_path, data))
    gen = load_video_model(cfg, torch.device("cpu"))
    trainer = build_learner(cfg, DistInfo(), model=gen)
    assert gen.latent_shape == (16, 60, 104) and trainer.prompts.heldout(1) == [
        ["a cyan triangle moves right", "a cyan triangle moves up"]
    ]
    record = trainer.train_step(0)
    assert trainer.video_layout == VideoLayout(45, (21,))  # 12 latent frames, switch at 6
    assert trainer.last_videos.shape == (3, 45, 3, 16, 16)
    assert torch.isfinite(torch.tensor(record["energy/current"])).all()
    assert record["sync/ratio_exactly_one"] is True
