"""Translation of the authors' checkpoint, denoising schedule, model, cache, prompt and
exploration keys."""

from __future__ import annotations

from kvpo.training.authors.rule import NO_EFFECT
from kvpo.training.authors.translation import Translator
from kvpo.training.authors.values import integer


def translate_model(t: Translator) -> None:
    """Checkpoints, denoising schedule, model and cache."""
    t.copy("generator_ckpt", "lora_ckpt")
    if t.get("lora_ckpt") not in (None, ""):  # their trainer keeps training the loaded LoRA
        t.set("lora_init", "continue", "lora_ckpt")
    t.copy("denoising_step_list")
    t.switch(
        "last_step_only",
        "every block runs every denoising step (this project's sampler)",
        "their rollout stops every block at one random denoising step (drawn per rollout) and "
        "keeps its x0 prediction there; here every block runs every step; the run proceeds",
    )
    t.copy(
        "warp_denoising_step",
        "num_frame_per_block",
        "model_kwargs.local_attn_size",
        "model_kwargs.timestep_shift",
        "model_kwargs.sink_size",
        "slice_last_frames",
        "context_noise",
    )
    if t.has("model_kwargs.bank_size") or t.has("model_kwargs.record_interval"):
        bank_keys = [k for k in ("model_kwargs.bank_size", "model_kwargs.record_interval")
                     if t.has(k)]  # fmt: skip
        t.copy(*bank_keys)
        t.set("routing_rule", "memflow", bank_keys[0])  # their MemFlow pipeline's routing
        t.set("recache_rule", "memflow", bank_keys[0])  # and its one-pass recache
        _memflow_recache_size(t)
    else:
        t.copy("recache_full_kv_cache_after_switch")
    if t.has("model_kwargs.SMA"):
        sma = t.value("model_kwargs.SMA")
        t.set("model_kwargs.sma", sma, "model_kwargs.SMA")
        t.row("model_kwargs.SMA", f"model_kwargs.sma = {sma!r}")


def _memflow_recache_size(t: Translator) -> None:
    """Their MemFlow ``recache_after_switch`` re-encodes ``local_attn_size`` frames whatever
    ``recache_full_kv_cache_after_switch`` says (only their LongLive pipeline reads it)."""
    key = "recache_full_kv_cache_after_switch"
    t.set(key, False, key)
    t.row(key, f"{key} = False (recache_rule = 'memflow': their MemFlow recache ignores it)",
          NO_EFFECT)  # fmt: skip
    if t.value(key):
        t.note(key, "no effect in their MemFlow pipeline: a switch re-encodes the last "
               "local_attn_size frames; set false here")  # fmt: skip


def translate_prompts(t: Translator) -> None:
    """The streaming layout, the prompt file and the prompt switches."""
    lengths = t.copy("streaming_max_length", "streaming_chunk_size", "streaming_min_new_frame")
    t.copy("data_path")
    t.set("prompt_order", "sweep", "data_path")  # their rollouts sweep the file in order
    for key in ("prompt_min_segments", "prompt_max_segments"):
        value = t.get(key)
        value = 0 if value in (None, "") else integer(value, key)
        t.set(key, value, key)
        t.row(key, f"{key} = {value}" + (" (off)" if value == 0 else ""))
    _switch_frames(t, lengths)
    t.switch(
        "global_sink",
        "this project's recache (sink kept, last local_attn_size frames re-encoded)",
        "their run clears the cache at a prompt switch and re-encodes the sink with the new "
        "prompt; here the sink keeps the first prompt's K/V; the run proceeds without it",
    )


def _switch_frames(t: Translator, lengths: list[int | None]) -> None:
    """``switch_frame_indices``, each moved to the first later chunk start when
    ``align_switch_to_chunk`` is true (the last chunk's start past the end)."""
    switches = t.value("switch_frame_indices")
    align = t.value("align_switch_to_chunk")
    aligned = switches
    if align and switches and all(v is not None and v > 0 for v in lengths):
        from kvpo.method.routing import chunk_layout

        starts = [c.start_frame for c in chunk_layout(*lengths)[1:]]
        if starts:
            aligned = [next((s for s in starts if s >= x), starts[-1]) for x in switches]
    text = ", ".join(str(s) for s in aligned)
    t.set("switch_frame_indices", text, "switch_frame_indices")
    moved = "" if aligned == switches else f" (moved from {switches} to chunk starts)"
    t.row("switch_frame_indices", f"switch_frame_indices = {text!r}{moved}")
    if not align:
        effect = "not applied"
    elif aligned == switches:
        effect = f"applied: {switches} are chunk starts already (no change)"
    else:
        effect = f"applied: {switches} -> {aligned}"
    t.row("align_switch_to_chunk", f"switch_frame_indices: {effect}")


def translate_exploration(t: Translator) -> None:
    """Branches per group, their backward chunks and the routed window."""
    (K,) = t.copy("K")
    chunk = integer(t.get("branch_backward_chunk_size") or 0, "branch_backward_chunk_size")
    if K is not None and 0 < chunk < K:
        rows = chunk
        why = f"{chunk} branches per backward pass there"
    else:
        rows = "auto"
        why = "all branches in one backward pass there; here the memory planner's choice"
    t.set("row_micro_batch", rows, "branch_backward_chunk_size")
    t.row(
        "branch_backward_chunk_size",
        f"row_micro_batch = {rows!r} ({why}; results do not depend on it)",
    )
    t.copy("m_nearest_frames", "perturb_within_first_x_chunks", "perturb_num_blocks")
