"""A Wan-format checkpoint through the trainer (stand-in text encoder and VAE, no Wan weights):
rewards and held-out scores on the decoded frames (4 per latent frame)."""

import pytest
import torch

from kvpo.training.config import ConfigError


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
