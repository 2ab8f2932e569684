"""LoRA through peft: import of LongLive/MemFlow-style checkpoints equals merged weights; adapter
switching (trainable policy, frozen old copy, disabled reference)."""

import copy

import pytest
import torch

from kvpo.models.lora import (
    active_adapter,
    adapters_disabled,
    add_lora,
    freeze_copy,
    import_lora,
    load_lora_state_dict,
    lora_parameters,
    lora_state_dict,
)
from kvpo.training.checkpoint import export_adapter
from tests.kvpo.models.reference import random_model

# LongLive's targets: every nn.Linear of a block, in the original Wan naming
TARGETS = ["self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q",
           "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2"]  # fmt: skip
DIFFUSERS = dict(zip(TARGETS, ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                               "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
                               "ffn.net.0.proj", "ffn.net.2"]))  # fmt: skip
TARGETS_DIFFUSERS = list(DIFFUSERS.values())


def _outputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 2, 16, 16, generator=g)
    text = torch.randn(2, 4, 32, generator=g)
    with torch.no_grad():
        return model(x, torch.tensor([800.0, 200.0]), model.encode_text(text))


def _random_lora(model, rank, naming):
    """A LoRA state dict with non-zero A and B for every target of every block."""
    sd = {}
    for i in range(model.config.num_layers):
        for target in TARGETS:
            linear = model.transformer.get_submodule(f"blocks.{i}.{DIFFUSERS[target]}")
            name = naming(i, target)
            sd[name.format("A")] = 0.3 * torch.randn(rank, linear.in_features)
            sd[name.format("B")] = 0.3 * torch.randn(linear.out_features, rank)
    return sd


def _merged(model, sd, naming, rank, alpha):
    merged = copy.deepcopy(model)
    with torch.no_grad():
        for i in range(model.config.num_layers):
            for target in TARGETS:
                linear = merged.transformer.get_submodule(f"blocks.{i}.{DIFFUSERS[target]}")
                name = naming(i, target)
                delta = sd[name.format("B")] @ sd[name.format("A")]
                linear.weight += (alpha / rank) * delta
    return merged


@pytest.mark.parametrize(
    "style",
    ["longlive", "memflow_adapter_names", "fsdp", "diffusers"],
)
def test_imported_lora_equals_merged_weights(style):
    model = random_model()
    rank, alpha = 4, 8.0
    namings = {
        "longlive": "base_model.model.blocks.{i}.{t}.lora_{{}}.weight",
        "memflow_adapter_names": "base_model.model.blocks.{i}.{t}.lora_{{}}.default.weight",
        "fsdp": "_fsdp_wrapped_module.base_model.model.blocks.{i}.{t}.lora_{{}}.weight",
        "diffusers": "transformer.blocks.{i}.{d}.lora_{{}}.weight",
    }

    def naming(i, target):
        return namings[style].format(i=i, t=target, d=DIFFUSERS[target])

    sd = _random_lora(model, rank, naming)
    expected = _outputs(_merged(model, sd, naming, rank, alpha))
    base = _outputs(model)
    ckpt = {"generator_lora": sd, "critic_lora": {}} if style != "diffusers" else sd
    assert import_lora(model, ckpt, alpha=alpha) == rank
    got = _outputs(model)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert (got - base).abs().max() > 1e-2  # the adapter does something


def test_import_rejects_unknown_modules():
    model = random_model()
    sd = {"base_model.model.blocks.7.self_attn.q.lora_A.weight": torch.zeros(4, 64),
          "base_model.model.blocks.7.self_attn.q.lora_B.weight": torch.zeros(64, 4)}  # fmt: skip
    with pytest.raises(ValueError, match=r"not in the model: \['blocks.7.attn1.to_q'\]"):
        import_lora(model, {"generator_lora": sd})


def test_policy_old_and_reference_adapters():
    model = random_model()
    base = _outputs(model)
    params = add_lora(model, rank=4)
    assert params and all(p.requires_grad for p in params)
    torch.testing.assert_close(_outputs(model), base)  # B = 0: unchanged at start
    with torch.no_grad():
        for p in params:
            p.add_(0.2 * torch.randn_like(p))
    trained = _outputs(model)
    assert (trained - base).abs().max() > 1e-2
    freeze_copy(model)  # old := policy
    with torch.no_grad():
        for p in params:
            p.add_(0.2 * torch.randn_like(p))
    moved = _outputs(model)
    with active_adapter(model, "old"):
        torch.testing.assert_close(_outputs(model), trained)
    with adapters_disabled(model):
        torch.testing.assert_close(_outputs(model), base)
    torch.testing.assert_close(_outputs(model), moved)
    assert all(p.requires_grad for p in lora_parameters(model, "default").values())
    assert not any(p.requires_grad for p in lora_parameters(model, "old").values())
    # gradients reach only the trainable adapter
    loss = model(torch.randn(1, 3, 2, 16, 16), 500.0, model.encode_text(torch.randn(1, 4, 32)))
    loss.square().mean().backward()
    assert all(p.grad is not None for p in lora_parameters(model, "default").values())
    assert all(p.grad is None for p in lora_parameters(model, "old").values())


def test_lora_state_dict_round_trip():
    model = random_model()
    add_lora(model, rank=2)
    with torch.no_grad():
        for p in lora_parameters(model).values():
            p.normal_()
    saved, out = lora_state_dict(model), _outputs(model)
    other = random_model()
    add_lora(other, rank=2)
    load_lora_state_dict(other, saved)
    torch.testing.assert_close(_outputs(other), out)
    with pytest.raises(ValueError, match="missing"):
        load_lora_state_dict(other, {k: v for k, v in list(saved.items())[1:]})


def test_import_reads_alpha_of_a_peft_save_pretrained_directory(tmp_path):
    """A peft ``save_pretrained`` adapter carries its alpha in ``adapter_config.json``."""
    trained = random_model()
    add_lora(trained, rank=4, alpha=2.0, targets=TARGETS_DIFFUSERS)
    with torch.no_grad():
        for p in lora_parameters(trained).values():
            p.normal_(0, 0.3)
    export_adapter(trained, tmp_path)  # peft's adapter_config.json + adapter_model.safetensors
    fresh = random_model()
    import_lora(fresh, tmp_path / "adapter_model.safetensors")
    torch.testing.assert_close(_outputs(fresh), _outputs(trained), atol=1e-5, rtol=1e-4)
    scale_one = random_model()
    import_lora(scale_one, tmp_path / "adapter_model.safetensors", alpha=4.0)
    assert (_outputs(scale_one) - _outputs(trained)).abs().max() > 1e-3  # alpha matters
