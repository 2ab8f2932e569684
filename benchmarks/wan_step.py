"""One KVPO training step of the real Wan2.1-1.3B layer shape, random weights, time and memory
per phase.

The transformer is the real architecture (diffusers' ``WanTransformer3DModel`` layers in
:class:`~kvpo.models.CausalWan`: dim 1536, 12 heads x 128, FFN 8960, text 512 tokens x 4096)
with ``--layers`` of its 30 layers and random weights, at the latent size ``--latent``. The run
is ``configs/longlive.yaml`` (sink 3, window 12, 33 resident frames, blocks of 3, P = 5 routed
blocks, m = 4, G = 8 + anchor, LoRA rank 256, 4 steps, gradient checkpointing, EMA) with a
video of ``--frames`` latent frames and prompt switches at ``--switches``, so one step runs the
prefix (with a recache), the routed window, the continuation (with a recache in every row),
rewards, the three replays (old, reference, current with grad) and the update.

What is not the real part, and why: the prompt encoder is a seeded random ``[512, 4096]``
embedding per prompt (umT5-XXL has 5.7B parameters); the decoder is a fixed random linear map
of each latent pixel to an ``8 x 8`` RGB patch (the Wan VAE decodes about one 64 x 64 frame a
second on this CPU, too slow for a 10-minute step); the reward is a plain function of the
decoded pixels (frame-to-frame change and contrast). Their memory is the planner's to count.

Measured per phase: seconds, K/V bytes (the paged store's exact peak during the phase) and
allocations above the phase's starting level (activations, decoded videos, optimiser states
on their first step: on CUDA the caching allocator's peak, on CPU the profiler's allocation
events); held throughout: weights, LoRA, optimiser states, the K/V pool; on CUDA the step's
device peak.

    python -m benchmarks.wan_step --layers 2 --latent 16x8x8 --frames 48   # CPU, ~5 min
    python -m benchmarks.wan_step --device cuda --dtype bfloat16 --layers 30 --latent 16x60x104
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

import torch

from benchmarks.harness import AllocationPeak, Row, metadata
from kvpo.models import WAN_1_3B, CausalWan
from kvpo.training.config_parse import load_config
from kvpo.training.distributed import DistInfo
from kvpo.training.learner import PHASES
from kvpo.training.phases import PhaseTimer
from kvpo.training.prompts import PromptSource
from kvpo.training.trainer import build_learner
from kvpo.video_model import VideoModel

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    ["a red fox trots through fresh snow", "the fox stops and looks up", "snow starts to fall"],
    ["waves roll onto a rocky beach", "a gull lands on a rock", "the sun sets over the sea"],
]


def random_video_model(layers: int, latent: tuple[int, int, int], dtype, device) -> VideoModel:
    """Wan2.1-1.3B's layer shape with ``layers`` layers and random weights, a seeded random
    prompt encoder and a random linear patch decoder (see the module docstring)."""
    channels, height, width = latent
    config = dataclasses.replace(
        WAN_1_3B, num_layers=layers, in_channels=channels, out_channels=channels,
        latent_height=height, latent_width=width,
    )  # fmt: skip
    torch.manual_seed(0)
    wan = CausalWan.from_config(config, dtype=dtype, device=device).eval()
    wan.requires_grad_(False)
    patch = torch.randn(channels, 3 * 8 * 8, generator=torch.Generator().manual_seed(1))
    patch = (patch / channels**0.5).to(device, dtype)

    def encode(prompts: list[str]):
        embeds = []
        for prompt in prompts:
            g = torch.Generator().manual_seed(zlib.crc32(prompt.encode()))
            embeds.append(torch.randn(512, config.text_dim, generator=g))
        return wan.encode_text(torch.stack(embeds).to(device, dtype))

    def decode(latents: torch.Tensor) -> torch.Tensor:
        """``[B, C, T, h, w] -> [B, T, 3, 8h, 8w]`` in [0, 1]."""
        b, c, t, h, w = latents.shape
        pix = torch.einsum("bcthw,cp->bthwp", latents.to(patch.dtype), patch)
        pix = pix.view(b, t, h, w, 3, 8, 8).permute(0, 1, 4, 2, 5, 3, 6)
        return torch.sigmoid(pix.reshape(b, t, 3, 8 * h, 8 * w).float())

    return VideoModel(wan, encode, decode, lambda f: f, (channels, height, width))


def pixel_reward(videos: torch.Tensor, prompts, metadata=None) -> dict[str, torch.Tensor]:
    """``videos [B, T, 3, H, W]`` -> ``{"motion": [B], "contrast": [B]}`` (a reward's call:
    prompts and metadata are not used)."""
    motion = (videos[:, 1:] - videos[:, :-1]).abs().mean(dim=(1, 2, 3, 4))
    contrast = videos.std(dim=(2, 3, 4)).mean(dim=1)
    return {"motion": motion, "contrast": contrast}


class MeasuredPhases(PhaseTimer):
    """A :class:`PhaseTimer` that also records, per phase, the paged store's K/V peak and the
    allocations' peak above the phase's starting level."""

    def __init__(self, device: torch.device, store) -> None:
        super().__init__(device)
        self.store = store
        self.kv_bytes: dict[str, int] = {}
        self.alloc_bytes: dict[str, int] = {}

    @contextmanager
    def __call__(self, name: str):
        self.store.reset_peak()
        with super().__call__(name), AllocationPeak(self.device) as peak:
            yield
        self.kv_bytes[name] = max(self.kv_bytes.get(name, 0), self.store.peak_held_bytes)
        self.alloc_bytes[name] = max(self.alloc_bytes.get(name, 0), peak.bytes)


def step_config(args) -> list[str]:
    """``configs/longlive.yaml`` overrides for the reduced step."""
    return [
        f"device={args.device}", f"dtype={args.dtype}", "lora_ckpt=null",
        "generator_ckpt=null", "show_progress=false", f"streaming_max_length={args.frames}",
        f"switch_frame_indices={','.join(str(s) for s in args.switches)}",
        "long_reward_normal_clip_len=12", f"row_micro_batch={args.row_micro_batch}",
        "reward_components=[{name: motion, weight: 1.0}, {name: contrast, weight: 0.5}]",
        f"seed={args.seed}",
    ]  # fmt: skip


def run(args) -> dict:
    """Build the learner and run one training step; the measurements as a dict."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cfg = load_config(ROOT / "configs" / "longlive.yaml", step_config(args))
    t0 = time.perf_counter()
    model = random_video_model(args.layers, args.latent, dtype, device)
    prompts = PromptSource.from_sequences(PROMPTS, PROMPTS, seed=cfg.seed)
    learner = build_learner(cfg, DistInfo(device=device), model=model, reward=pixel_reward,
                            prompts=prompts)  # fmt: skip
    build_s = time.perf_counter() - t0
    timer = MeasuredPhases(device, learner.cache.store)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    record = learner.train_step(0, timer)
    wan, store = model.wan.config, learner.cache.store
    lora = sum(p.numel() * p.element_size() for p in learner.params)
    planned = planner_prediction(cfg, wan, args, record["routing/start_frame"])
    states = [t for st in learner.optimizer.state.values() for t in st.values()]
    return {
        "config": {
            "layers": args.layers,
            "latent": list(args.latent),
            "frames": args.frames,
            "switches": list(args.switches),
            "dtype": args.dtype,
            "device": args.device,
            "dim": wan.dim,
            "heads": wan.num_attention_heads,
            "head_dim": wan.attention_head_dim,
            "ffn_dim": wan.ffn_dim,
            "tokens_per_frame": wan.tokens_per_frame,
            "fork_frame": record["routing/start_frame"],
            "row_micro_batch": args.row_micro_batch,
        },  # fmt: skip
        "build_seconds": build_s,
        "seconds": {p: timer.seconds.get(p, 0.0) for p in PHASES},
        "kv_bytes": {p: timer.kv_bytes.get(p, 0) for p in PHASES},
        "alloc_bytes": {p: timer.alloc_bytes.get(p, 0) for p in PHASES},
        "rollout_kv_bytes": {k: int(v) for k, v in record["kv_bytes"].items()},
        "kv_bytes_per_frame": store.page_bytes,
        "kv_pool_bytes": store.pool.numel() * store.pool.element_size(),
        "copied_kv_bytes": store.copied_bytes,
        "weight_bytes": sum(t.numel() * t.element_size() for t in model.wan.parameters()),
        "lora_bytes": lora,
        "optimizer_bytes": sum(t.numel() * t.element_size() for t in states if t.dim() > 0),
        "device_peak_bytes": torch.cuda.max_memory_allocated(device)
        if device.type == "cuda"
        else None,
        "routed": record["routing/plan"],
        "planned": planned,
        "loss": record["loss"],
    }


def planner_prediction(cfg, wan, args, fork: int) -> dict:
    """The memory planner's prediction for this step (:mod:`kvpo.planning`): K/V frames per
    rollout phase at this fork, bytes per phase and the step's peak. The reward model of the
    config is left out (the step scores with :func:`pixel_reward`), and so are the text encoder
    and the VAE (a toy-like setup: the stand-ins are not counted)."""
    from kvpo.planning import Setup, plan_memory
    from kvpo.planning.phases import kv_held_frames

    setup = Setup(wan, args.dtype, torch.device(args.device).type, False, 512, "random Wan")
    plan = plan_memory(cfg, setup, args.row_micro_batch)
    kept = [line for line in plan.resident if not line.what.startswith("reward model")]
    resident = sum(line.bytes for line in kept)
    worst = max(plan.phases, key=lambda phase: phase.bytes)
    return {
        "kv_frames": kv_held_frames(cfg, plan.rows, fork),
        "phase_bytes": {phase.name: phase.bytes for phase in plan.phases},
        "resident_bytes": resident,
        "peak_phase": worst.name,
        "peak_bytes": resident + worst.bytes,
    }


def table(result: dict) -> str:
    """A markdown table of one result: seconds, K/V MiB (frames) and allocation MiB per phase."""
    mib, frame = 2.0**20, result["kv_bytes_per_frame"]
    lines = [
        "| phase | seconds | K/V MiB (frames) | allocations MiB |",
        "| --- | ---: | ---: | ---: |",
    ]
    for p in PHASES:
        kv = result["kv_bytes"][p]
        lines.append(
            f"| {p} | {result['seconds'][p]:.1f} | {kv / mib:.1f} ({kv / frame:.0f}) | "
            f"{result['alloc_bytes'][p] / mib:.1f} |"
        )
    total = sum(result["seconds"].values())
    lines.append(f"| step | {total:.1f} | | |")
    held = {k: result[k] / mib for k in ("weight_bytes", "lora_bytes", "optimizer_bytes")}
    lines.append(
        "\nheld throughout: weights {weight_bytes:.0f} MiB (LoRA {lora_bytes:.0f} MiB), "
        "optimiser {optimizer_bytes:.0f} MiB".format(**held)
        + f", K/V pool {result['kv_pool_bytes'] / mib:.0f} MiB; K/V copied "
        f"{result['copied_kv_bytes']} bytes"
    )
    plan, frame = result["planned"], result["kv_bytes_per_frame"]
    measured = {k: v / frame for k, v in result["rollout_kv_bytes"].items()}
    lines.append(
        "planner: rollout K/V frames "
        + ", ".join(f"{k} {plan['kv_frames'][k]} (measured {measured[k]:.0f})" for k in measured)
        + f"; step peak {plan['peak_bytes'] / mib:.0f} MiB in {plan['peak_phase']}"
        + (
            f" (measured device peak {result['device_peak_bytes'] / mib:.0f} MiB)"
            if result["device_peak_bytes"] is not None
            else " (the CPU has no device peak to compare)"
        )
    )
    return "\n".join(lines)


def harness_rows(result: dict) -> list[dict]:
    """One results-file row per phase (``python -m benchmarks.report`` renders them): time,
    allocations above the phase's start as ``peak``, K/V as ``held``."""
    c = result["config"]
    case = (
        f"Wan2.1-1.3B layer shape x {c['layers']} layers, latent {'x'.join(map(str, c['latent']))}"
        f" ({c['tokens_per_frame']} tok/frame), {c['frames']} frames, switches "
        f"{','.join(map(str, c['switches']))}, G=8+anchor, {c['dtype']}"
    )
    mib = 2.0**20
    held = (
        f"weights_MiB={result['weight_bytes'] / mib:.0f}, lora_MiB={result['lora_bytes'] / mib:.0f}"
        f", optimizer_MiB={result['optimizer_bytes'] / mib:.0f}"
    )
    rows = []
    for p in PHASES:
        ms = 1000 * result["seconds"][p]
        extra = {"kv_frames": round(result["kv_bytes"][p] / result["kv_bytes_per_frame"], 1)}
        if p == "update":
            extra["held_throughout"] = held
        row = Row("wan_step", case, p, False, ms, ms, ms, result["alloc_bytes"][p],
                  result["kv_bytes"][p], extra)  # fmt: skip
        rows.append(dataclasses.asdict(row))
    return rows


def _latent(text: str) -> tuple[int, int, int]:
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"--latent must look like CxHxW (16x8x8), got {text!r}")
    return tuple(int(p) for p in parts)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.wan_step", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    ap.add_argument("--layers", type=int, default=2, help="transformer layers (of 30)")
    ap.add_argument("--latent", type=_latent, default=(16, 8, 8), help="latent CxHxW")
    ap.add_argument("--frames", type=int, default=48, help="latent frames of the video")
    ap.add_argument("--switches", type=int, nargs="+", default=[15, 39], help="switch frames")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--row-micro-batch", type=int, default=0, help="rows per forward (0: all)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument(
        "--out", type=Path, default=None,
        help="write wan_step-<device>.json here (benchmarks/results: RESULTS.md renders it)",
    )  # fmt: skip
    return ap


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    result = run(args)
    print(table(result))
    print(json.dumps({k: result[k] for k in ("config", "rollout_kv_bytes", "loss")}))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        device = torch.device(args.device)
        path = args.out / f"wan_step-{device.type}.json"
        payload = {"meta": metadata(device), "rows": harness_rows(result), "result": result}
        path.write_text(json.dumps(payload, indent=1) + "\n")
        print(f"written {path}")
    return result


if __name__ == "__main__":
    main()
