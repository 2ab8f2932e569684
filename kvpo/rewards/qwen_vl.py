"""A Qwen2-VL reward backbone: transformers' ``Qwen2VLModel`` built from a local base-model
directory and a released reward checkpoint, and its hidden states at the reward tokens.

Both Qwen2-VL reward models (HPSv3, VideoAlign) score a prompt by reading the last layer's
hidden state at special tokens of the text (``<|Reward|>``; ``<|VQ_reward|>``, ...) through a
small head. Their forward passes the LLM plain 1-D positions ``0 .. L-1`` in all three M-RoPE
sections (their ``Qwen2VLRewardModelBT.forward`` calls the text model with ``position_ids=None``
in transformers 4.45), so :meth:`QwenBackbone.hidden_at` does the same, with right padding and an
attention mask.

Loading: ``config.json`` (and the tokenizer, unless the checkpoint brings its own) come from the
base model directory (``Qwen2-VL-7B-Instruct`` / ``Qwen2-VL-2B-Instruct``); the vocabulary size is
the checkpoint's (the reward tokens were added); weights are assigned from the checkpoint without
a random initialisation (the model is built on the meta device), after a strict key and shape
check.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from kvpo.rewards.checkpoint import check_state, describe
from kvpo.rewards.placement import Placement, batches
from kvpo.rewards.qwen_inputs import chat_text, encode

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def require_dir(path: str | Path, what: str, files: Sequence[str]) -> Path:
    """``path`` as a Path after checking it is a directory holding ``files``; else one
    FileNotFoundError naming what was expected and what was found."""
    path = Path(path)
    missing = [f for f in files if not (path / f).is_file()] if path.is_dir() else list(files)
    if missing:
        raise FileNotFoundError(
            f"{what}: expected a directory holding {list(files)}, found {describe(path)}"
            + (f" (missing {missing})" if path.is_dir() else "")
        )
    return path


def base_directory(base_model, named: str | None, what: str, source: str) -> Path:
    """The base model directory: ``base_model``, else ``named`` (the checkpoint config's
    ``model_name_or_path``) when that is a local directory; it must hold ``config.json``."""
    if base_model is None and named and Path(named).is_dir():
        base_model = named
    if base_model is None:
        raise FileNotFoundError(
            f"{what} needs base_model= the base model directory (config.json, tokenizer files): "
            f"{source} names {named!r}, not a local directory"
        )
    return require_dir(base_model, f"{what} base model", ["config.json"])


def load_tokenizer(directory: Path, extra_tokens: Sequence[str] = ()):
    """The tokenizer of ``directory`` (right padding), with ``extra_tokens`` added as special
    tokens in order when it lacks them (the reward models' training code adds them this way)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        str(directory), local_files_only=True, padding_side="right"
    )
    new = [t for t in extra_tokens if t not in tokenizer.get_vocab()]
    if new:
        tokenizer.add_special_tokens({"additional_special_tokens": list(new)})
    return tokenizer


def chat_template(directories: Sequence[Path], tokenizer) -> str:
    """The processor's chat template (``chat_template.json`` / ``chat_template.jinja`` of the
    first directory that has one), else the tokenizer's."""
    for directory in directories:
        if (directory / "chat_template.json").is_file():
            return json.loads((directory / "chat_template.json").read_text())["chat_template"]
        if (directory / "chat_template.jinja").is_file():
            return (directory / "chat_template.jinja").read_text()
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    raise FileNotFoundError(
        f"no chat template: expected chat_template.json or chat_template.jinja in "
        f"{[str(d) for d in directories]} or one in tokenizer_config.json"
    )


def build_backbone(
    config_dir: Path, state: Mapping[str, torch.Tensor], dtype: torch.dtype, what: str
) -> nn.Module:
    """transformers' ``Qwen2VLModel`` of ``config_dir/config.json`` with the weights ``state``
    (keys ``visual.*``, ``language_model.*``; see :func:`kvpo.rewards.checkpoint.qwen2vl_state`),
    in ``dtype``, eval mode, no gradients."""
    from transformers import Qwen2VLConfig, Qwen2VLModel

    config = Qwen2VLConfig.from_pretrained(str(config_dir), local_files_only=True)
    embed = state.get("language_model.embed_tokens.weight")
    if embed is not None:
        config.text_config.vocab_size = int(embed.shape[0])
    config._attn_implementation = "sdpa"
    config.text_config._attn_implementation = "sdpa"
    config.vision_config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = Qwen2VLModel(config)
    check_state(model.state_dict(), state, what)
    model.load_state_dict(state, assign=True, strict=True)
    for name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)):  # rotary tables: recompute
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, type(module)(module.config))
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{what}: tensors left without values after loading: {left[:8]}")
    return model.to(dtype).eval().requires_grad_(False)


class QwenBackbone:
    """A Qwen2-VL backbone with its tokenizer and chat template, kept on the CPU and moved to
    the scoring device per call (:class:`~kvpo.rewards.placement.Placement`)."""

    def __init__(self, model: nn.Module, head: nn.Module, tokenizer, template: str, offload: bool):
        self.model, self.head, self.tokenizer, self.template = model, head, tokenizer, template
        self.placement = Placement(nn.ModuleDict({"model": model, "head": head}), offload)
        self.config = model.config
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else tokenizer.convert_tokens_to_ids("<|endoftext|>")

    def token_id(self, token: str) -> int:
        """The id of ``token``; ValueError when the tokenizer or the embeddings lack it."""
        ids = self.tokenizer.convert_tokens_to_ids([token])
        if ids[0] is None or ids[0] == self.tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no token {token!r}")
        vocab = self.config.text_config.vocab_size
        if ids[0] >= vocab:
            raise ValueError(f"{token} has id {ids[0]}; the checkpoint has {vocab} embeddings")
        return int(ids[0])

    @torch.no_grad()
    def hidden_at(
        self,
        kind: str,
        patches: Sequence[torch.Tensor],
        grids: Sequence[tuple[int, int, int]],
        texts: Sequence[str],
        markers: Sequence[int],
        device: torch.device,
    ) -> torch.Tensor:
        """Last hidden states ``[B, len(markers), D]`` (model dtype) at the ``markers`` token ids
        (each exactly once per row) of ``B`` prompts, each with one ``kind`` ("image"/"video")
        input: ``patches[b]`` from :func:`~kvpo.rewards.qwen_inputs.patchify`, ``grids[b]``."""
        placeholder = self.config.image_token_id if kind == "image" else self.config.video_token_id
        counts = [t * h * w // 4 for t, h, w in grids]
        rendered = [chat_text(self.tokenizer, self.template, kind, text) for text in texts]
        ids, mask = encode(self.tokenizer, rendered, placeholder, counts, self.pad_id)
        positions = torch.arange(ids.shape[1]).view(1, 1, -1).expand(3, ids.shape[0], -1)
        pixels = torch.cat(list(patches)).to(device, self.model.dtype)
        grid = torch.tensor(list(grids), device=device)
        vision = {"pixel_values": pixels, "image_grid_thw": grid} if kind == "image" else {
            "pixel_values_videos": pixels, "video_grid_thw": grid}  # fmt: skip
        out = self.model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
            use_cache=False,
            **vision,
        )
        hidden = out.last_hidden_state
        rows = torch.arange(ids.shape[0], device=device)
        picked = []
        for marker in markers:
            found = ids == marker
            if not bool((found.sum(1) == 1).all()):
                raise ValueError(f"reward token {marker} must occur once per prompt")
            picked.append(hidden[rows, found.long().argmax(1).to(device)])
        return torch.stack(picked, dim=1)

    def score(self, kind, patches, grids, texts, markers, device, batch_size) -> torch.Tensor:
        """``head(hidden_at(...))`` in batches of ``batch_size`` prompts: ``[B, ...]`` fp32."""
        out = []
        with self.placement.on(device):
            for rows in batches(len(texts), batch_size):
                hidden = self.hidden_at(
                    kind, patches[rows], grids[rows], texts[rows], markers, device
                )
                out.append(self.apply_head(hidden))
        return torch.cat(out)

    def apply_head(self, hidden: torch.Tensor) -> torch.Tensor:
        head_dtype = next(self.head.parameters()).dtype
        return self.head(hidden.to(head_dtype)).float()
