"""Loading causal Wan weights: diffusers directories, original Wan naming, training checkpoints.

Accepted sources (``load_model``):

- a diffusers directory (``config.json`` + ``diffusion_pytorch_model*.safetensors``, or a pipeline
  directory with a ``transformer/`` subfolder), read locally only;
- a file (``.safetensors``, ``.pt``, ``.pth``, ``.bin``) or an in-memory state dict, in diffusers
  naming (``blocks.0.attn1.to_q.weight``) or in the original Wan naming used by Self-Forcing,
  CausVid, LongLive and MemFlow (``blocks.0.self_attn.q.weight``), possibly wrapped as a training
  checkpoint: a ``generator`` / ``generator_ema`` / ``model`` / ``state_dict`` sub-dict, keys
  prefixed by ``model.`` (Self-Forcing's ``WanDiffusionWrapper``), ``model.diffusion_model.``, or
  wrapper prefixes (``_fsdp_wrapped_module.``, ``_orig_mod.``, ``_checkpoint_wrapped_module.``,
  ``module.``).

Every key must map onto the model and every weight of the model must be given, with matching
shapes; otherwise :class:`CheckpointMismatch` lists the unexpected, missing and mis-shaped keys.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from kvpo.models.causal_wan import CausalWan, cast_transformer
from kvpo.models.config import WAN_1_3B, WanConfig

CHECKPOINT_KEYS = ("generator", "generator_ema", "model", "state_dict", "module")
WRAPPER_PREFIXES = (
    "_fsdp_wrapped_module.",
    "_orig_mod.",
    "_checkpoint_wrapped_module.",
    "module.",
)
WHOLE_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")

# Original Wan module paths -> diffusers module paths (applied to the path before the parameter
# name; block paths are matched after the ``blocks.<i>.`` prefix).
_TOP_LEVEL = {
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
    "patch_embedding": "patch_embedding",
}
_IN_BLOCK = {
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "self_attn.norm_q": "attn1.norm_q",
    "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "cross_attn.norm_q": "attn2.norm_q",
    "cross_attn.norm_k": "attn2.norm_k",
    "norm3": "norm2",  # Wan's cross-attention norm is norm3; diffusers calls it norm2
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}
_PARAMETERS = {"modulation": "scale_shift_table", "head.modulation": "scale_shift_table"}
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


class CheckpointMismatch(ValueError):
    """A state dict whose keys or shapes do not fit the model."""


def original_to_diffusers(name: str) -> str | None:
    """Diffusers name of an original-Wan parameter or module path (None when unknown).

    ``blocks.3.self_attn.q.weight`` -> ``blocks.3.attn1.to_q.weight``; also module paths such as
    ``blocks.3.ffn.0`` -> ``blocks.3.ffn.net.0.proj`` (used for LoRA keys).
    """
    if name in _PARAMETERS:
        return _PARAMETERS[name]
    match = _BLOCK.match(name)
    table, prefix, rest = (_IN_BLOCK, f"blocks.{match[1]}.", match[2]) if match else (
        _TOP_LEVEL, "", name
    )  # fmt: skip
    if match and rest == "modulation":
        return prefix + "scale_shift_table"
    for old, new in table.items():
        if rest == old:
            return prefix + new
        if rest.startswith(old + "."):
            return prefix + new + rest[len(old) :]
    return None


def is_original_naming(keys) -> bool:
    """Whether keys use the original Wan naming (``self_attn``, ``head.head``, ...)."""
    markers = (".self_attn.", ".cross_attn.", "head.head.", "time_embedding.")
    return any(m in "." + k for k in keys for m in markers)


def unwrap_checkpoint(obj, key: str | None = None, use_ema: bool = False) -> dict:
    """The tensor dict inside a training checkpoint.

    Args:
        obj: a loaded checkpoint: a flat ``{name: tensor}`` dict or a dict holding one under
            ``generator`` / ``generator_ema`` / ``model`` / ``state_dict``.
        key: the sub-dict to take (default: ``generator_ema`` when ``use_ema``, which must then
            exist; else the first of ``generator``, ``generator_ema``, ``model``, ``state_dict``,
            ``module`` present -- the order of the LongLive / MemFlow KVPO trainers).
    """
    if not isinstance(obj, Mapping):
        raise TypeError(f"a checkpoint must be a dict, got {type(obj).__name__}")
    if key is None and use_ema:
        key = "generator_ema"
    if key is None and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)
    if key is None:
        key = next((k for k in CHECKPOINT_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            is_lora = any("lora" in str(k) for k in obj)
            hint = " (a LoRA checkpoint: import it with lora.import_lora)" if is_lora else ""
            raise KeyError(
                f"no weights found: the checkpoint's top-level keys are {sorted(obj)[:20]}; "
                f"expected tensors or one of {list(CHECKPOINT_KEYS)}{hint}"
            )
    if key not in obj:
        raise KeyError(f"checkpoint has no {key!r}; its top-level keys are {sorted(obj)[:20]}")
    return unwrap_checkpoint(obj[key])


def strip_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes anywhere in the keys and a prefix shared by every key."""
    out = {}
    for name, tensor in state_dict.items():
        for prefix in WRAPPER_PREFIXES:
            name = name.replace(prefix, "")
        out[name] = tensor
    for prefix in WHOLE_PREFIXES:
        if out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix) :]: v for k, v in out.items()}
    return out


def to_diffusers_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Unwrapped keys in diffusers naming (original Wan names converted)."""
    state_dict = strip_prefixes(state_dict)
    if not is_original_naming(state_dict):
        return state_dict
    out, unknown = {}, []
    for name, tensor in state_dict.items():
        new = original_to_diffusers(name)
        if new is None:
            unknown.append(name)
        else:
            out[new] = tensor
    if unknown:
        raise CheckpointMismatch(
            f"{len(unknown)} keys in original Wan naming have no diffusers counterpart: "
            f"{_listing(unknown)}"
        )
    return out


def read_state_dict(path: str | Path) -> dict:
    """A checkpoint file as a dict (``.safetensors`` or a torch pickle, tensors only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def config_from_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    attention_head_dim: int = 128,
    latent_height: int = 60,
    latent_width: int = 104,
) -> WanConfig:
    """Infer a :class:`WanConfig` from diffusers-named weights (heads = dim / head dim)."""
    try:
        patch = state_dict["patch_embedding.weight"]  # [dim, C_in, p_t, p_h, p_w]
        text = state_dict["condition_embedder.text_embedder.linear_1.weight"]
        time = state_dict["condition_embedder.time_embedder.linear_1.weight"]
        ffn = state_dict["blocks.0.ffn.net.0.proj.weight"]
        head = state_dict["proj_out.weight"]
    except KeyError as err:
        raise CheckpointMismatch(f"cannot infer the model shape: no {err.args[0]!r}") from err
    dim, patch_size = patch.shape[0], tuple(patch.shape[2:])
    if dim % attention_head_dim:
        raise CheckpointMismatch(
            f"hidden size {dim} is not a multiple of head dim {attention_head_dim}"
        )
    layers = 1 + max(int(m[1]) for k in state_dict if (m := _BLOCK.match(k)))
    return WanConfig(
        patch_size=patch_size,
        num_attention_heads=dim // attention_head_dim,
        attention_head_dim=attention_head_dim,
        in_channels=patch.shape[1],
        out_channels=head.shape[0] // (patch_size[0] * patch_size[1] * patch_size[2]),
        text_dim=text.shape[1],
        freq_dim=time.shape[1],
        ffn_dim=ffn.shape[0],
        num_layers=layers,
        latent_height=latent_height,
        latent_width=latent_width,
    )


def load_state_dict_into(model: CausalWan, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Copy diffusers-named weights into ``model``; every key and shape must match."""
    own = {k: v for k, v in model.transformer.state_dict().items() if ".lora_" not in k}
    own = {k.replace(".base_layer.", "."): v for k, v in own.items()}
    unexpected = sorted(set(state_dict) - set(own))
    missing = sorted(set(own) - set(state_dict))
    shapes = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)}, model {tuple(own[k].shape)}"
        for k in set(own) & set(state_dict)
        if tuple(state_dict[k].shape) != tuple(own[k].shape)
    )
    if unexpected or missing or shapes:
        parts = []
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {_listing(unexpected)}")
        if missing:
            parts.append(f"{len(missing)} missing keys: {_listing(missing)}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches: {_listing(shapes)}")
        raise CheckpointMismatch("checkpoint does not fit the model: " + "; ".join(parts))
    with torch.no_grad():
        params = dict(model.transformer.named_parameters())
        params.update(dict(model.transformer.named_buffers()))
        for name, value in state_dict.items():
            target = params[name] if name in params else params[_base_layer_name(name)]
            target.copy_(value.to(target.dtype))


def load_model(
    source: str | Path | Mapping,
    config: WanConfig | None = None,
    *,
    key: str | None = None,
    use_ema: bool = False,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attention_head_dim: int = 128,
) -> CausalWan:
    """A :class:`CausalWan` with weights from ``source``.

    Args:
        source: a diffusers directory, a checkpoint file, or a (possibly wrapped) state dict.
        config: the model shape; default: a diffusers directory's ``config.json`` with the
            Wan2.1 latent size, else inferred from the weights (``attention_head_dim``, latent
            60x104).
        key, use_ema: which sub-dict of a training checkpoint (see :func:`unwrap_checkpoint`).
        dtype, device: of the model (diffusers' fp32 modules stay fp32).
    """
    if isinstance(source, (str, Path)) and Path(source).is_dir():
        return _load_diffusers_dir(Path(source), config, dtype, device)
    raw = read_state_dict(source) if isinstance(source, (str, Path)) else source
    state_dict = to_diffusers_state_dict(unwrap_checkpoint(raw, key, use_ema))
    if config is None:
        config = config_from_state_dict(state_dict, attention_head_dim)
    model = CausalWan.from_config(config, dtype=dtype, device=device)
    load_state_dict_into(model, state_dict)
    return model


def _load_diffusers_dir(path: Path, config, dtype, device) -> CausalWan:
    from diffusers import WanTransformer3DModel

    if not (path / "config.json").is_file() and (path / "transformer" / "config.json").is_file():
        path = path / "transformer"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} is not a diffusers model directory "
            "(no config.json, nor transformer/config.json)"
        )
    transformer = WanTransformer3DModel.from_pretrained(
        str(path), torch_dtype=dtype, local_files_only=True
    ).to(device)
    if config is None:
        config = WanConfig.from_diffusers_config(
            json.loads((path / "config.json").read_text()),
            WAN_1_3B.latent_height,
            WAN_1_3B.latent_width,
        )
    return CausalWan(cast_transformer(transformer, dtype), config)


def _base_layer_name(name: str) -> str:
    """The name of a weight once peft wrapped its linear (``...to_q.base_layer.weight``)."""
    module, _, param = name.rpartition(".")
    return f"{module}.base_layer.{param}"


def _listing(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
