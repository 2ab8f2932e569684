"""Checkpoint round trips in each supported format, written by the tests themselves."""

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from safetensors.torch import save_file

from kvpo.models import tiny_config
from kvpo.models.loading import CheckpointMismatch, config_from_state_dict, load_model
from tests.kvpo.models.reference import random_model, small_config

# The original Wan module names (wan/modules/model.py: WanModel), transcribed for the tests.
ORIGINAL = {
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "proj_out": "head.head",
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn1.norm_q": "self_attn.norm_q",
    "attn1.norm_k": "self_attn.norm_k",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "attn2.norm_q": "cross_attn.norm_q",
    "attn2.norm_k": "cross_attn.norm_k",
    "norm2": "norm3",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
}


def original_name(name: str) -> str:
    if name == "scale_shift_table":
        return "head.modulation"
    if name.endswith(".scale_shift_table"):
        return name.replace("scale_shift_table", "modulation")
    module, _, param = name.rpartition(".")
    head, _, tail = module.partition(".") if module.startswith("blocks.") else ("", "", module)
    if head:
        index, _, tail = tail.partition(".")
        head = f"blocks.{index}."
    return head + ORIGINAL.get(tail, tail) + "." + param


def original_state_dict(model, prefix=""):
    sd = {prefix + original_name(k): v.clone() for k, v in model.transformer.state_dict().items()}
    return sd


def assert_same_weights(a, b):
    sa, sb = a.transformer.state_dict(), b.transformer.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_original_names_agree_with_diffusers_converter():
    model = random_model()
    converted = convert_wan_transformer_to_diffusers(original_state_dict(model))
    assert converted.keys() == model.transformer.state_dict().keys()


def test_diffusers_directory_round_trip(tmp_path):
    model = random_model()
    model.transformer.save_pretrained(tmp_path / "transformer")
    loaded = load_model(tmp_path, small_config())
    assert_same_weights(model, loaded)
    x, text = torch.randn(1, 3, 2, 16, 16), torch.randn(1, 4, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(x, 500.0, loaded.encode_text(text)), model(x, 500.0, model.encode_text(text))
        )


def test_flat_safetensors_in_diffusers_naming(tmp_path):
    model = random_model()
    save_file(model.transformer.state_dict(), tmp_path / "w.safetensors")
    assert_same_weights(model, load_model(tmp_path / "w.safetensors", small_config()))


def test_self_forcing_checkpoint_generator_and_ema(tmp_path):
    """``{"generator": ..., "generator_ema": ...}`` with the wrapper's ``model.`` prefix."""
    model, ema = random_model(seed=1), random_model(seed=2)
    ckpt = {
        "generator": original_state_dict(model, "model."),
        "generator_ema": original_state_dict(ema, "model."),
        "step": 100,
    }
    torch.save(ckpt, tmp_path / "checkpoint_model_000100.pt")
    path = tmp_path / "checkpoint_model_000100.pt"
    assert_same_weights(model, load_model(path, small_config()))
    assert_same_weights(ema, load_model(path, small_config(), use_ema=True))
    assert_same_weights(ema, load_model(path, small_config(), key="generator_ema"))


def test_fsdp_and_compile_wrapper_prefixes():
    model = random_model()
    wrapped = {}
    for k, v in original_state_dict(model).items():
        k = (
            k.replace("blocks.", "blocks._fsdp_wrapped_module.", 1)
            if k.startswith("blocks.")
            else k
        )
        wrapped["_orig_mod.model._fsdp_wrapped_module." + k] = v
    assert_same_weights(model, load_model({"model": wrapped}, small_config()))


def test_config_is_inferred_from_weights():
    model = random_model()
    cfg = config_from_state_dict(model.transformer.state_dict(), 32, 16, 16)
    assert cfg == small_config()
    loaded = load_model(original_state_dict(model), attention_head_dim=32)
    assert loaded.config == tiny_config(latent_height=60, latent_width=104)
    assert_same_weights(model, loaded)


def test_mismatches_name_every_offending_key():
    model = random_model()
    sd = original_state_dict(model)
    sd.pop("blocks.1.self_attn.q.weight")
    sd["blocks.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatch, match="no diffusers counterpart: blocks.0.extra.weight"):
        load_model(sd, small_config())
    sd.pop("blocks.0.extra.weight")
    with pytest.raises(CheckpointMismatch, match=r"missing keys: blocks\.1\.attn1\.to_q\.weight"):
        load_model(sd, small_config())
    sd = model.transformer.state_dict()
    sd["proj_out.weight"] = torch.zeros(5, 64)
    sd["blocks.9.attn1.to_q.weight"] = torch.zeros(64, 64)
    with pytest.raises(CheckpointMismatch) as err:
        load_model(sd, small_config())
    assert "unexpected keys: blocks.9.attn1.to_q.weight" in str(err.value)
    assert "proj_out.weight: checkpoint (5, 64), model (48, 64)" in str(err.value)
    with pytest.raises(KeyError, match="expected tensors or one of"):
        load_model({"optimizer": {"x": 1}}, small_config())


def test_encoders_load_local_paths_only(tmp_path):
    from kvpo.models.encoders import WanTextEncoder, WanVAE

    for wrapper in (WanTextEncoder, WanVAE):
        with pytest.raises(FileNotFoundError, match="local paths only"):
            wrapper(tmp_path / "missing")
