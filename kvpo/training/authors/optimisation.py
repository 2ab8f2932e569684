"""Translation of the authors' optimisation, step-count, evaluation, output and LoRA keys."""

from __future__ import annotations

import math

from kvpo.training.authors.translation import Translator
from kvpo.training.authors.values import integer, number
from kvpo.training.config import ConfigError


def translate_optimisation(t: Translator) -> None:
    """AdamW, the LR schedule, the training step, the step count and the EMA."""
    t.copy("lr", "lr_scheduler", "weight_decay", "max_grad_norm", "gradient_checkpointing")
    accum = t.value("gradient_accumulation_steps")
    t.set("sync_every", accum, "gradient_accumulation_steps")
    t.row(
        "gradient_accumulation_steps",
        f"sync_every = {accum} (old policy re-synced every {accum} rollouts; one AdamW step per "
        "rollout and epoch in both)",
    )
    epochs = t.values.get("ppo_epochs") or 1
    warmup = t.value("lr_warmup_steps")
    t.set("lr_warmup_steps", warmup, "lr_warmup_steps")
    t.row("lr_warmup_steps", f"lr_warmup_steps = {warmup} (training steps, as theirs)")
    if warmup > 0 and t.values.get("lr_scheduler") != "constant":
        t.inexact(
            "lr_warmup_steps",
            f"lr_warmup_steps={warmup}",
            f"their first training step runs at LR 0 (diffusers' factor k/{warmup} from k = 0); "
            f"here training step s runs at (s + 1)/{warmup}, one step ahead, and a decaying "
            "schedule spans max_train_steps + 1 steps (docs/reference-differences.md)",
        )
    steps = None if t.get("max_train_steps") is None else t.value("max_train_steps")
    if steps is None:
        t.row("max_train_steps", "max_train_steps: this project's default")
    else:
        t.set("max_train_steps", steps, "max_train_steps")
        t.row(
            "max_train_steps",
            f"max_train_steps = {steps} ({steps} training steps of {accum} rollouts: "
            f"{steps * accum} rollouts, {steps * accum * epochs} AdamW steps in both)",
        )
    ema = t.value("ema_decay")
    t.set("ema_decay", ema, "ema_decay")
    t.set("eval_use_ema", ema > 0, "ema_decay")
    t.row("ema_decay", f"ema_decay = {ema!r}, eval_use_ema = {ema > 0}")
    if ema > 0:
        t.inexact(
            "ema_decay",
            "ema_decay",
            "their evaluation scores the online and the EMA weights; here one set is scored, "
            "the EMA weights (eval_use_ema=true; eval_use_ema=false for the online ones)",
        )


def _world(t: Translator) -> int:
    """Their launched ranks, from ``num_gpus`` (at least 1)."""
    return max(1, integer(t.leaves.get("num_gpus", 1), "num_gpus"))


def translate_evaluation(t: Translator) -> None:
    """The save and evaluation intervals, the held-out prompts and the seed."""
    accum = t.values["sync_every"]
    for what in ("save", "eval"):
        steps_key, samples_key = f"{what}_interval_steps", f"{what}_interval_samples"
        steps = t.value(steps_key)
        samples = t.value(samples_key)
        if steps > 0:
            ours = steps
            t.row(steps_key, f"{steps_key} = {ours} ({steps} training steps, as theirs)")
            t.row(samples_key, f"no effect: {steps_key} is set")
        elif samples > 0:
            world = _world(t)
            ours = math.ceil(samples / (world * accum))
            t.row(steps_key, f"0: {samples_key} decides")
            t.row(samples_key, f"{steps_key} = {ours} (not exact: printed)")
            t.inexact(
                samples_key,
                f"{steps_key}={ours}",
                f"every {samples} samples at {world} ranks (num_gpus) is every "
                f"{samples / world:g} rollouts; rounded up to whole sync windows of {accum}",
            )
        else:
            ours = 0
            t.row(steps_key, f"{steps_key} = 0 (never)")
            t.row(samples_key, "0 (never)")
        t.set(steps_key, ours, steps_key)
    raw = t.get("eval_prompts")
    if isinstance(raw, str) and not raw.strip().lstrip("+-").isdigit():
        if raw.strip().lower() not in ("world_size", "num_gpus", "auto"):
            raise ConfigError(
                f"eval_prompts {raw!r}: the authors' code accepts an integer or world_size, "
                "num_gpus, auto"
            )
        count = _world(t)
        t.row("eval_prompts", f"eval_prompts = {count} (num_gpus; printed)")
        t.note(
            "eval_prompts",
            f"mapped to eval_prompts={count}: their {raw} is the number of launched ranks, taken "
            f"here from num_gpus={count} (a multi-node run holds out num_gpus x nodes: set "
            "eval_prompts=N)",
        )
    else:
        count = integer(raw, "eval_prompts")
        t.row(
            "eval_prompts",
            f"eval_prompts = {count}"
            if count > 0
            else "no held-out evaluation: eval_before = eval_after = false",
        )
    if count > 0:
        t.set("eval_prompts", count, "eval_prompts")
    else:
        for key in ("eval_before", "eval_after"):
            t.set(key, False, "eval_prompts")
        t.set("eval_interval_steps", 0, "eval_prompts")
    t.copy("seed")


def translate_output(t: Translator) -> None:
    """The run directory, the progress bar and the LoRA adapter."""
    out = t.get("output_dir")
    if out is not None:
        t.set("output_dir", str(out), "output_dir")
        t.row("output_dir", f"output_dir = {str(out)!r}")
    else:
        t.row("output_dir", "output_dir: this project's default")
    run = t.get("run_name")
    t.set("run_name", "" if run is None else str(run), "run_name")
    t.row("run_name", f"run_name = {t.values['run_name']!r}")
    t.copy("show_progress")
    t.switch(
        "group_outputs_by_run",
        "this project's behaviour (fixed)",
        "their run writes straight into output_dir; here every run gets its own directory under "
        "it; the run proceeds",
    )
    t.switch(
        "resume_output_dir_from_checkpoint",
        "this project's behaviour (fixed)",
        "their resumed run writes into a fresh run directory; here --resume continues in the "
        "checkpoint's run directory; the run proceeds",
    )
    if not any(k.startswith("adapter.") for k in t.leaves):
        t.notes.append(
            "adapter: absent: not implemented here: without an adapter section their run trains "
            "every weight of the generator; here a LoRA adapter is trained (adapter.* defaults "
            "apply)"
        )
    _, rank = t.copy("adapter.type", "adapter.rank")
    alpha = t.get("adapter.alpha")
    alpha = number(alpha, "adapter.alpha") if alpha not in (None, "", 0) else float(rank)
    t.set("adapter.alpha", alpha, "adapter.alpha")
    t.set("lora_ckpt_alpha", alpha, "adapter.alpha")
    if t.has("adapter.alpha"):
        t.row("adapter.alpha", f"adapter.alpha = {alpha!r}, lora_ckpt_alpha = {alpha!r}")
    t.copy("adapter.dropout")
