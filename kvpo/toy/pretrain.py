"""Pretrain the toy model: teacher-forced, block-causal flow matching on generated videos.

``python -m kvpo.toy.pretrain [--steps N[,N2,...]] [--batch B] [--run-dir DIR] [--out DIR]``

Per step, ``B`` fresh training videos (:func:`kvpo.toy.world.sample_batch`, seeded by the step)
of 8 blocks are mapped to latents ``x0 = 2 * frames - 1``. Block ``b`` is learned from its
context exactly as the sampler will see it: rows ``[0, B)`` carry the noisy block
``x_t = (1 - sigma) x0 + sigma eps`` (sigma one of the sampler's levels with probability 1/2,
else ``U(0, 1)``) and are trained to predict ``v = eps - x0``; rows ``[B, 2B)`` carry the clean
block, lightly noised (``sigma_c = 0`` or ``U(0, 0.1)``, timestep ``1000 sigma_c``), and their
keys/values become the context of the following blocks (sink + newest frames, the
:class:`~kvpo.models.frame_cache.CachePolicy` window), with gradient. Each block is conditioned
on the sentence of its prompt segment. Loss: mean squared velocity error over all blocks.

AdamW (lr 2e-3, 50 warmup steps, constant, then linear decay to 10% over the last 40% of the
steps), grad-norm clip 1. ``--steps 400,700,2500`` (the default: the shipped weights' recipe)
runs stages: each stage ends at its step count, and the learning rate of a step follows the
schedule of the stage it is in (steps 400-699 go back to the peak lr, then decay over the
last 40% of the 700, and so on), as when a run is resumed with a larger ``--steps``.
``--stop-at N`` ends the run after ``N`` steps without changing that schedule (default 900:
the shipped weights are step 900 of that recipe, chosen as the model card explains).

A checkpoint with the optimizer and step goes to ``--run-dir`` every
``--save-every`` steps; rerunning the same command resumes from it (data and noise are functions
of the seed and step, so a resumed run matches an uninterrupted one). At the end the weights go
to ``--out`` (default: the package's weights).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kvpo.models.cache_policy import CachePolicy
from kvpo.outputs.progress import Progress
from kvpo.toy.config import TOY
from kvpo.toy.model import WEIGHTS_DIR, ToyModel, save_toy_model
from kvpo.toy.prompts import parse_prompt, segment_text
from kvpo.toy.world import sample_batch


class TeacherForcingContext:
    """Dense context for one teacher-forced pass (a ``BlockContext`` of ``CausalWan``).

    Rows ``[0, B)`` are the noisy blocks, rows ``[B, 2B)`` the clean ones; both attend to the
    clean frames chosen by ``policy.window`` followed by themselves. The clean rows' keys and
    values (``[B, F * tokens, H, D]`` per block and layer, with grad) are kept for later blocks.
    """

    writes = False

    def __init__(self, policy: CachePolicy, num_layers: int, tokens_per_frame: int):
        self.policy, self.tokens = policy, tokens_per_frame
        self.keys: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
        self.values: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
        self.start_frame = 0

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """q, k, v: [2B, L, H, D] -> [2B, L, H, D]."""
        half = q.shape[0] // 2
        if self.keys[layer]:
            frames = self.policy.window(self.start_frame, k.shape[1] // self.tokens)
            index = torch.tensor(
                [f * self.tokens + i for f in frames for i in range(self.tokens)], device=k.device
            )
            ctx_k = torch.cat(self.keys[layer], 1).index_select(1, index).repeat(2, 1, 1, 1)
            ctx_v = torch.cat(self.values[layer], 1).index_select(1, index).repeat(2, 1, 1, 1)
            k_all, v_all = torch.cat([ctx_k, k], 1), torch.cat([ctx_v, v], 1)
        else:
            k_all, v_all = k, v
        self.keys[layer].append(k[half:])
        self.values[layer].append(v[half:])
        scores = torch.einsum("blhd,bmhd->bhlm", q, k_all) * q.shape[-1] ** -0.5
        return torch.einsum("bhlm,bmhd->blhd", scores.softmax(-1), v_all)


def teacher_forced_loss(
    model: ToyModel, frames: torch.Tensor, stories: list[str], starts, generator: torch.Generator
) -> torch.Tensor:
    """Flow-matching loss of a batch. frames: [B, T, 3, H, W] in [0, 1] -> scalar."""
    cfg = model.config
    batch, num_frames = frames.shape[:2]
    fpb = cfg.frames_per_block
    x0 = (2 * frames - 1).permute(0, 2, 1, 3, 4)  # [B, 3, T, H, W]
    sentences, row_prompt = [], []
    for story, seg_starts in zip(stories, starts):
        texts = [segment_text(s) for s in parse_prompt(story)]
        per_block = []
        for b in range(num_frames // fpb):
            k = sum(1 for s in seg_starts if s <= b * fpb) - 1
            per_block.append(len(sentences) + k)
        sentences.extend(texts)
        row_prompt.append(per_block)
    text = model.encode(sentences)
    ctx = TeacherForcingContext(cfg.cache_policy, cfg.num_layers, cfg.wan.tokens_per_frame)
    sampler_sigmas = torch.tensor(cfg.sigmas)
    losses = []
    for b in range(num_frames // fpb):
        clean = x0[:, :, b * fpb : (b + 1) * fpb]
        eps = torch.randn(clean.shape, generator=generator)
        pick = sampler_sigmas[torch.randint(len(sampler_sigmas), (batch,), generator=generator)]
        uniform = torch.rand(batch, generator=generator)
        sigma = torch.where(torch.rand(batch, generator=generator) < 0.5, pick, uniform)
        sigma_c = torch.rand(batch, generator=generator) * 0.1
        sigma_c = torch.where(torch.rand(batch, generator=generator) < 0.5, 0.0, sigma_c)
        eps_c = torch.randn(clean.shape, generator=generator)
        s, sc = sigma.view(-1, 1, 1, 1, 1), sigma_c.view(-1, 1, 1, 1, 1)
        noisy = (1 - s) * clean + s * eps
        context_in = (1 - sc) * clean + sc * eps_c
        rows = torch.tensor([p[b] for p in row_prompt])
        ctx.start_frame = b * fpb
        v = model.wan(
            torch.cat([noisy, context_in]),
            torch.cat([1000 * sigma, 1000 * sigma_c]),
            text.select(torch.cat([rows, rows])),
            start_frame=b * fpb,
            context=ctx,
        )
        losses.append(F.mse_loss(v[:batch], eps - clean))
    return torch.stack(losses).mean()


def _lr_factor(step: int, stages: list[int], warmup: int = 50, decay: float = 0.4) -> float:
    """Linear warmup, constant, then linear decay to 10% over the last ``decay`` of the steps of
    the stage (``stages``: increasing step counts) that ``step`` falls in. ``step`` counts the
    optimizer steps already taken; the step right after a stage's end keeps that stage's final
    factor, as a run resumed from the stage's checkpoint does (the optimizer state holds it)."""
    total = next((t for t in stages if step <= t), stages[-1])
    start = int(total * (1 - decay))
    if step < warmup:
        return (step + 1) / warmup
    if step < start:
        return 1.0
    return 1.0 - 0.9 * (step - start) / max(1, total - start)


def _stages(text: str) -> list[int]:
    """``"400,700,2500"`` -> [400, 700, 2500] (positive, increasing)."""
    try:
        stages = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected N or N1,N2,... (integers), got {text!r}"
        ) from None
    if not stages or stages[0] < 1 or any(a >= b for a, b in zip(stages, stages[1:])):
        raise argparse.ArgumentTypeError(
            f"stage ends must be positive and increasing, got {text!r}"
        )
    return stages


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m kvpo.toy.pretrain", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--steps",
        type=_stages,
        default=[400, 700, 2500],
        help="optimizer steps, or increasing stage ends N1,N2,... (each stage restarts the lr "
        "schedule at its peak; default 400,700,2500: the shipped weights' schedule)",
    )
    parser.add_argument("--batch", type=int, default=6, help="videos per step (default 6)")
    parser.add_argument("--blocks", type=int, default=TOY.num_blocks, help="blocks per video")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    parser.add_argument("--warmup", type=int, default=50, help="lr warmup steps")
    parser.add_argument(
        "--stop-at",
        type=int,
        default=900,
        help="stop after this many steps (the lr schedule stays that of --steps); default 900: "
        "the shipped weights, see the model card; 0 = run all of --steps",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, data and noise")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1 is fastest on a shared machine)",
    )
    parser.add_argument("--run-dir", default="runs/toy_pretrain", help="checkpoints and log")
    parser.add_argument("--save-every", type=int, default=100, help="checkpoint interval")
    parser.add_argument("--out", default=str(WEIGHTS_DIR), help="where the final weights go")
    args = parser.parse_args(argv)
    if args.stop_at < 0:
        parser.error(f"--stop-at must be >= 0 (0 = all of --steps), got {args.stop_at}")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    run = Path(args.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    model = ToyModel(TOY)
    optim = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: _lr_factor(s, args.steps, args.warmup)
    )
    total = min(args.steps[-1], args.stop_at or args.steps[-1])
    step, elapsed = 0, 0.0
    ckpt_path = run / "checkpoint.pt"
    if ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, weights_only=False)
        model.load_state_dict(ckpt["model"])
        optim.load_state_dict(ckpt["optim"])
        sched.load_state_dict(ckpt["sched"])
        step, elapsed = ckpt["step"], ckpt["elapsed"]
        print(f"resuming from {ckpt_path} at step {step}")
    log = (run / "log.jsonl").open("a")
    bar = Progress(total, initial=step, every=50, desc="pretrain")
    model.train()
    while step < total:
        t0 = time.perf_counter()
        frames, stories, starts = sample_batch(
            args.batch, args.blocks, seed=args.seed * 10**7 + step
        )
        gen = torch.Generator().manual_seed(args.seed * 10**7 + step)
        loss = teacher_forced_loss(model, frames, stories, starts, gen)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        grad = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        sched.step()
        step += 1
        elapsed += time.perf_counter() - t0
        log.write(
            json.dumps(
                {
                    "step": step,
                    "loss": loss.item(),
                    "grad_norm": grad.item(),
                    "lr": sched.get_last_lr()[0],
                    "elapsed_s": elapsed,
                }
            )
            + "\n"
        )
        log.flush()
        bar.update(step, loss=loss.item())
        if step % args.save_every == 0 or step in args.steps or step == total:
            torch.save(
                {
                    "model": model.state_dict(),
                    "optim": optim.state_dict(),
                    "sched": sched.state_dict(),
                    "step": step,
                    "elapsed": elapsed,
                },
                ckpt_path,
            )
    bar.close()
    save_toy_model(model, args.out)
    print(f"pretrained {step} steps in {elapsed / 60:.1f} min; weights in {args.out}")


if __name__ == "__main__":
    main()
