"""What the planner knows of a run besides the config: the model's shape and dtype, the video
geometry, and the device footprint of the text encoder, the VAE and the reward model.

:func:`setup_for` reads the shape from the config's ``generator_ckpt`` without loading weights:
the toy model's ``config.json``, a diffusers directory's ``config.json``, or (a ``.pt`` /
``.safetensors`` file, or a path that does not exist here) the Wan2.1-T2V-1.3B shape, said so in
a note.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from kvpo.method.routing import eligible_start_blocks
from kvpo.models.config import WAN_1_3B, WanConfig
from kvpo.planning.components import (
    QWEN2_VL_2B,
    QWEN2_VL_7B,
    qwen2vl_parameters,
    raft_parameters,
    umt5_encoder_parameters,
    wan_vae_parameters,
)
from kvpo.training.config import TrainConfig

SIZES = {"float32": 4, "bfloat16": 2, "float16": 2}
QWEN_ACTIVATIONS = 2**30
"""Estimate (not derived) of a Qwen2-VL reward backbone's activations in one scoring batch."""


@dataclass
class Setup:
    """The model and device side of a plan.

    ``wan``: a Wan checkpoint (umT5 text encoder, VAE: 4 video frames per latent frame, 8x
    pixels) rather than the toy model (RGB latents); ``text_len``: tokens of an encoded prompt.
    """

    model: WanConfig
    dtype: str
    device_type: str
    wan: bool
    text_len: int
    model_note: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def element_size(self) -> int:
        return SIZES[self.dtype]

    @property
    def pixels(self) -> int:
        """Pixels of one decoded frame."""
        m = self.model
        return (64 if self.wan else 1) * m.latent_height * m.latent_width

    def video_frame(self, latent_frame: int) -> int:
        """First decoded frame of a latent frame (Wan VAE: ``4 f - 3``, toy: ``f``)."""
        if not self.wan:
            return latent_frame
        return 0 if latent_frame <= 0 else 4 * latent_frame - 3

    def video(self, latent_frames: int) -> int:
        """Elements of one decoded video ``[T_video, 3, H, W]``."""
        return self.video_frame(latent_frames) * 3 * self.pixels


def setup_for(cfg: TrainConfig, device_type: str = "cuda", model: WanConfig | None = None) -> Setup:
    """The :class:`Setup` of ``cfg`` on a ``device_type`` device (``model``: the shape when the
    model is already loaded)."""
    from kvpo.training.config_parse import is_wan_checkpoint, resolved_dtype

    dtype = resolved_dtype(cfg, device_type)
    if not is_wan_checkpoint(cfg):
        from kvpo.toy.model import config_from_dict

        directory = Path(cfg.generator_ckpt or Path(__file__).parents[1] / "toy" / "weights")
        toy = config_from_dict(json.loads((directory / "config.json").read_text()))
        note = f"toy model ({directory})"
        return Setup(model or toy.wan, dtype, device_type, False, toy.text_max_len, note)
    note, notes = "", []
    if model is None:
        model, note = _wan_shape(Path(cfg.generator_ckpt))
        if "assumed" in note:
            notes.append(f"model shape {note}")
    return Setup(model, dtype, device_type, True, 512, note or "Wan", notes)


def _wan_shape(path: Path) -> tuple[WanConfig, str]:
    for candidate in (path / "config.json", path / "transformer" / "config.json"):
        if candidate.is_file():
            config = json.loads(candidate.read_text())
            shape = WanConfig.from_diffusers_config(
                config, WAN_1_3B.latent_height, WAN_1_3B.latent_width
            )
            return shape, f"from {candidate}"
    return WAN_1_3B, f"assumed Wan2.1-T2V-1.3B ({path} is not read)"


def text_encoder_bytes(element_size: int) -> int:
    """umT5-XXL encoder weights (loaded in the run's dtype)."""
    return umt5_encoder_parameters() * element_size


def vae_bytes(element_size: int) -> int:
    """Wan VAE weights (loaded in the run's dtype)."""
    return wan_vae_parameters() * element_size


# ---------------------------------------------------------------------- reward models
@dataclass
class RewardFootprint:
    """Device bytes of a reward model: its weights, what they are, the lines of one scoring
    call's working set, and notes."""

    weights: int = 0
    what: str = ""
    working: list = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def clip_frames(cfg: TrainConfig, setup: Setup) -> int:
    """Most decoded frames of one scored clip: the chunk holding the routed window (local) or
    one segment's clip or transition clip (global)."""
    chunks = cfg.chunks()
    starts = eligible_start_blocks(
        cfg.routing_geometry(), chunks, cfg.perturb_within_first_x_chunks
    )
    frame = setup.video_frame
    local = [frame(chunks[s.chunk_index].end_frame) - frame(chunks[s.chunk_index].start_frame)
             for s in starts] if cfg.train_local else []  # fmt: skip
    bounds = [0, *cfg.switch_frames, cfg.streaming_max_length]
    segments = [frame(b) - frame(a) for a, b in zip(bounds, bounds[1:])]
    clip = cfg.long_reward_normal_clip_len
    global_ = [min(clip, s) if clip else s for s in segments] if cfg.train_global else []
    if cfg.train_global and cfg.long_reward_enable_transition and cfg.switch_frames:
        global_.append(min(cfg.long_reward_transition_clip_len, frame(cfg.streaming_max_length)))
    return max(local + global_ + [1])


def reward_footprint(cfg: TrainConfig, setup: Setup) -> RewardFootprint:
    """The device footprint of ``cfg.reward_model`` by name (0 with a note when unknown)."""
    from kvpo.planning.phases import Line

    name = cfg.reward_model
    gpu = setup.device_type == "cuda"
    videos = (cfg.K + 1) * clip_frames(cfg, setup) * 3 * setup.pixels
    if name == "toy":
        return RewardFootprint(what="the toy reward (no weights)")
    if name == "video_hpsv3" or name.startswith("videoalign"):
        size = 2 if gpu else 4  # the scorers' dtype "auto": bf16 on a GPU
        if name == "video_hpsv3":  # RankNet head hidden -> 1024 -> 16 -> 2, fp32
            shape, h = QWEN2_VL_7B, QWEN2_VL_7B.hidden_size
            head_bytes = 4 * (h * 1024 + 1024 + 1024 * 16 + 16 + 16 * 2 + 2)
        else:  # VideoAlign: one bias-free linear hidden -> 1 in the scorer's dtype
            shape = QWEN2_VL_2B
            head_bytes = shape.hidden_size * size
        params = qwen2vl_parameters(shape)
        base = "Qwen2-VL-7B" if shape is QWEN2_VL_7B else "Qwen2-VL-2B"
        working = [
            Line("8-bit levels of the clips being scored (fp32, 2 alive)", 2 * videos * 4,
                 note="kvpo.rewards.qwen_inputs.levels over all rows of a clip"),
            Line(f"{base} activations of one scoring batch", QWEN_ACTIVATIONS, "estimate"),
        ]  # fmt: skip
        what = f"{base}, {params / 1e9:.2f} B parameters"
        return RewardFootprint(params * size + head_bytes, what, working)
    if name in ("motion_smoothness", "dynamic_degree"):
        pairs = cfg.reward_batch_size or 16
        cells = setup.pixels // 64
        corr = int(pairs * cells * cells * 4 * (1 + 1 / 4 + 1 / 16 + 1 / 64))
        working = [Line("RAFT correlation pyramid of one batch of frame pairs", corr, "estimate",
                        note=f"{pairs} pairs x (H/8 x W/8)^2 fp32 over 4 levels")]  # fmt: skip
        return RewardFootprint(raft_parameters() * 4, "RAFT large (fp32)", working)
    if name.startswith(("http://", "https://")):
        return RewardFootprint(what="a reward server (its own process and device)")
    return RewardFootprint(
        notes=[f"reward model {name!r} is not known to the planner: its memory is not counted"]
    )
