"""LoRA adapters through peft on the causal model's attention and feed-forward linears.

Adapters live in ``model.transformer`` (diffusers' peft integration), named: ``"default"`` is the
trainable policy; frozen copies (:func:`freeze_copy`) serve as the old policy (``"old"``) and,
when training continues a loaded LoRA, as the KL reference (``"ref"``, the initial LoRA);
:func:`adapters_disabled` runs the base weights (the reference of a fresh or merged LoRA). peft
marks the active adapter trainable whenever adapters are switched; the context managers here
restore every adapter's ``requires_grad`` on exit.

Cross-attention keys/values of encoded prompts (``CausalWan.encode_text``) depend on the
``attn2.to_k`` / ``attn2.to_v`` adapters: encode prompts again under each adapter state.

External LoRA checkpoints map onto the same modules by :func:`import_lora`. LongLive and MemFlow
(and KVPO trained on them) write the same format: ``peft.get_peft_model_state_dict`` of a
``PeftModel`` wrapping the original ``CausalWanModel``, LoRA on every ``nn.Linear`` of every block
(``self_attn.{q,k,v,o}``, ``cross_attn.{q,k,v,o}``, ``ffn.0``, ``ffn.2``), rank 256, alpha 256,
keys ``base_model.model.blocks.<i>.self_attn.q.lora_A.weight`` (``[r, in]``) / ``...lora_B.weight``
(``[out, r]``), stored under ``generator_lora`` next to non-weight entries (``step``,
``critic_lora``, ``optimizer``, ``lr_scheduler``, ...). A KVPO checkpoint also holds
``initial_generator_lora`` (same format) and ``ema``: the EMA of the trainable parameters under
the wrapper's names (``model.base_model.model.blocks.0.self_attn.q.lora_A.default.weight``,
fp32); pick those with ``key=``. MemFlow's memory bank has no weights (it stores past keys/values),
so MemFlow and LongLive checkpoints hold the same modules.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict

from kvpo.models.causal_wan import CausalWan
from kvpo.models.config import DEFAULT_TARGETS
from kvpo.models.loading import (
    WRAPPER_PREFIXES,
    CheckpointMismatch,
    is_original_naming,
    original_to_diffusers,
    read_state_dict,
)

LORA_CHECKPOINT_KEYS = ("generator_lora", "lora", "generator", "model", "state_dict")
_LORA_PREFIXES = ("base_model.model.", "transformer.", "model.diffusion_model.", "model.")


def add_lora(
    model: CausalWan,
    rank: int,
    alpha: float | None = None,
    targets: tuple[str, ...] | list[str] = DEFAULT_TARGETS,
    dropout: float = 0.0,
    adapter: str = "default",
) -> list[torch.nn.Parameter]:
    """Add a trainable LoRA adapter and make it active; returns its parameters.

    ``targets`` are module-name suffixes (peft ``target_modules``); ``alpha`` defaults to
    ``rank`` (scale 1, LongLive/KVPO: rank 256, alpha 256). ``B`` starts at zero, so the model's
    outputs are unchanged until the adapter is trained.
    """
    config = LoraConfig(
        r=rank, lora_alpha=alpha or rank, lora_dropout=dropout, target_modules=list(targets)
    )
    flags = _grad_flags(model)
    model.transformer.add_adapter(config, adapter_name=adapter)  # active and trainable
    _restore(model, flags)  # other adapters keep their flags
    return list(lora_parameters(model, adapter).values())


def lora_parameters(model: CausalWan, adapter: str = "default") -> dict[str, torch.nn.Parameter]:
    """The adapter's parameters by name (``blocks.0.attn1.to_q.lora_A.default.weight``, ...)."""
    tag = f".{adapter}."
    found = {n: p for n, p in model.transformer.named_parameters() if ".lora_" in n and tag in n}
    if not found:
        raise KeyError(f"no LoRA adapter {adapter!r}; adapters: {adapters(model)}")
    return found


def adapters(model: CausalWan) -> list[str]:
    return list(getattr(model.transformer, "peft_config", {}) or {})


def lora_state_dict(model: CausalWan, adapter: str = "default") -> dict[str, torch.Tensor]:
    """peft-format weights of the adapter (``blocks.0.attn1.to_q.lora_A.weight``), detached."""
    sd = get_peft_model_state_dict(model.transformer, adapter_name=adapter)
    return {k: v.detach().clone() for k, v in sd.items()}


def load_lora_state_dict(
    model: CausalWan, state_dict: Mapping[str, torch.Tensor], adapter: str = "default"
) -> None:
    """Load peft-format weights (as :func:`lora_state_dict` returns) into an existing adapter."""
    expected = set(get_peft_model_state_dict(model.transformer, adapter_name=adapter))
    unexpected, missing = sorted(set(state_dict) - expected), sorted(expected - set(state_dict))
    if unexpected or missing:
        raise CheckpointMismatch(
            f"LoRA weights do not fit adapter {adapter!r}: {len(unexpected)} unexpected "
            f"{unexpected[:8]}, {len(missing)} missing {missing[:8]}"
        )
    flags = _grad_flags(model)
    shapes = {n: p.shape for n, p in lora_parameters(model, adapter).items()}
    for key, value in state_dict.items():
        module, _, param = key.rpartition(".")
        name = f"{module}.{adapter}.{param}"
        if shapes[name] != value.shape:
            raise CheckpointMismatch(
                f"{key}: checkpoint {tuple(value.shape)}, adapter {tuple(shapes[name])}"
            )
    set_peft_model_state_dict(model.transformer, dict(state_dict), adapter_name=adapter)
    _restore(model, flags)


def freeze_copy(model: CausalWan, src: str = "default", dst: str = "old") -> None:
    """Make adapter ``dst`` a frozen copy of ``src`` (created on first use): the old policy.

    Call again to re-sync (e.g. every ``sync_every`` rollouts). ``src`` stays active.
    """
    if dst not in adapters(model):
        config = model.transformer.peft_config[src]
        flags = _grad_flags(model)
        with warnings.catch_warnings():  # peft warns that a second adapter is being added
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            model.transformer.add_adapter(_copy_config(config), adapter_name=dst)
        model.transformer.set_adapter(src)
        _restore(model, flags)
    source = lora_parameters(model, src)
    target = lora_parameters(model, dst)
    with torch.no_grad():
        for name, param in source.items():
            copy = target[name.replace(f".{src}.", f".{dst}.")]
            copy.copy_(param)
            copy.requires_grad_(False)


@contextmanager
def active_adapter(model: CausalWan, adapter: str) -> Iterator[None]:
    """Run the model with ``adapter`` active (e.g. ``"old"``); restores adapter and grad flags."""
    previous, flags = _active(model), _grad_flags(model)
    model.transformer.set_adapter(adapter)
    try:
        yield
    finally:
        model.transformer.set_adapter(previous)
        _restore(model, flags)


def adapter_scope(model: CausalWan, adapter: str | None):
    """:func:`active_adapter` of ``adapter``, or :func:`adapters_disabled` when it is None."""
    return active_adapter(model, adapter) if adapter else adapters_disabled(model)


@contextmanager
def adapters_disabled(model: CausalWan) -> Iterator[None]:
    """Run the base model without any adapter (the reference policy)."""
    flags = _grad_flags(model)
    model.transformer.disable_adapters()
    try:
        yield
    finally:
        model.transformer.enable_adapters()
        _restore(model, flags)


def import_lora(
    model: CausalWan,
    source: str | Path | Mapping,
    alpha: float | None = None,
    adapter: str = "default",
    key: str | None = None,
    dropout: float = 0.0,
) -> int:
    """Load an external LoRA checkpoint as adapter ``adapter`` (created when absent, with
    ``dropout``).

    Args:
        source: a file or dict: peft weights in original Wan naming (LongLive / MemFlow:
            ``generator_lora`` holding ``base_model.model.blocks.0.self_attn.q.lora_A.weight``),
            or in diffusers naming (``transformer.blocks.0.attn1.to_q.lora_A.weight``), with
            optional adapter names (``lora_A.default.weight``) and wrapper prefixes.
        alpha: LoRA alpha the adapter was trained with (default: ``lora_alpha`` of an
            ``adapter_config.json`` beside a peft ``save_pretrained`` file, else its rank,
            LongLive's and MemFlow's default).
        key: the sub-dict holding the weights (default: the first of
            ``generator_lora``, ``lora``, ``generator``, ``model``, ``state_dict`` present;
            ``initial_generator_lora`` or ``ema`` for those of a KVPO checkpoint).

    Returns:
        The rank.
    """
    raw = read_state_dict(source) if isinstance(source, (str, Path)) else dict(source)
    if alpha is None and isinstance(source, (str, Path)):
        peft_config = Path(source).parent / "adapter_config.json"
        if peft_config.is_file():
            alpha = json.loads(peft_config.read_text())["lora_alpha"]
    weights = _lora_weights(raw, key)
    if not weights:
        raise CheckpointMismatch("the LoRA checkpoint holds no weights")
    ranks = {v.shape[0] for k, v in weights.items() if k.endswith("lora_A.weight")}
    if len(ranks) != 1:
        raise CheckpointMismatch(f"LoRA checkpoint mixes ranks {sorted(ranks)}; expected one")
    rank = ranks.pop()
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in weights})
    own = {n for n, _ in model.transformer.named_modules()}
    unknown = [m for m in modules if m not in own]
    if unknown:
        raise CheckpointMismatch(
            f"{len(unknown)} LoRA target modules are not in the model: {unknown[:8]}"
        )
    if adapter not in adapters(model):
        add_lora(model, rank, alpha, targets=modules, dropout=dropout, adapter=adapter)
    load_lora_state_dict(model, weights, adapter)
    return rank


def _lora_weights(raw: Mapping, key: str | None) -> dict[str, torch.Tensor]:
    """Unwrapped peft-format LoRA weights in diffusers module naming, adapter names removed."""
    if key is not None or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        key = key or next(
            (k for k in LORA_CHECKPOINT_KEYS if isinstance(raw.get(k), Mapping)), None
        )
        if key is None or key not in raw:
            raise KeyError(
                f"no LoRA weights: top-level keys are {sorted(raw)[:20]}, expected tensors or one "
                f"of {list(LORA_CHECKPOINT_KEYS)}"
            )
        raw = raw[key]
    out = {}
    for name, tensor in raw.items():
        if ".lora_" not in name:
            raise CheckpointMismatch(f"{name!r} is not a LoRA weight (no '.lora_A/.lora_B')")
        for prefix in WRAPPER_PREFIXES:
            name = name.replace(prefix, "")
        module, _, rest = name.partition(".lora_")
        parts = rest.split(".")  # "A.weight" or "A.<adapter>.weight"
        out[(module, f"lora_{parts[0]}.{parts[-1]}")] = tensor
    modules = {m for m, _ in out}
    # shared prefixes nest: ``model.base_model.model.`` (the EMA of a wrapped peft model)
    while modules and (
        prefix := next((p for p in _LORA_PREFIXES if all(m.startswith(p) for m in modules)), "")
    ):
        modules = {m[len(prefix) :] for m in modules}
        out = {(m[len(prefix) :], p): v for (m, p), v in out.items()}
    if is_original_naming(modules):
        renamed = {m: original_to_diffusers(m) for m in modules}
        unknown = sorted(m for m, new in renamed.items() if new is None)
        if unknown:
            raise CheckpointMismatch(
                f"{len(unknown)} LoRA target modules in original Wan naming have no diffusers "
                f"counterpart in this model: {unknown[:8]}"
            )
        out = {(renamed[m], p): v for (m, p), v in out.items()}
    return {f"{m}.{p}": v for (m, p), v in out.items()}


def _copy_config(config: LoraConfig) -> LoraConfig:
    return LoraConfig(
        r=config.r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=sorted(config.target_modules),
    )


def _active(model: CausalWan) -> str | None:
    if not adapters(model):
        return None
    active = model.transformer.active_adapters()
    return active[0] if active else None


def _grad_flags(model: CausalWan) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.transformer.named_parameters() if ".lora_" in n}


def _restore(model: CausalWan, flags: dict[str, bool]) -> None:
    for name, param in model.transformer.named_parameters():
        if name in flags:
            param.requires_grad_(flags[name])


@torch.no_grad()
def merge_lora_into_base(model, source, alpha: float | None = None) -> None:
    """Add an external LoRA (:func:`import_lora` formats) to the base weights,
    ``W += scale * B @ A``, and drop it: the reference policy (adapters disabled) is then the
    starting model, as in LongLive / MemFlow KVPO where the LoRA is part of the generator.
    ``alpha``: the LoRA's alpha (None: its rank)."""
    import_lora(model, source, alpha=alpha, adapter="imported")
    for module in model.transformer.modules():
        if "imported" in getattr(module, "lora_A", {}):
            base = module.get_base_layer()
            base.weight += module.get_delta_weight("imported").to(base.weight.dtype)
    model.transformer.delete_adapters("imported")
