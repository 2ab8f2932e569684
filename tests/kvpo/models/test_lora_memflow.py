"""MemFlow checkpoints as MemFlow's own code writes them (KVPO repository, models/memflow/):

- the module tree of ``wan/modules/causal_model.py`` (``CausalWanModel`` inside
  ``utils/wan_wrapper.py:WanDiffusionWrapper.model``), transcribed below with its parameter names;
- LoRA by ``utils/lora_utils.py:configure_lora_for_model``: peft on every ``nn.Linear`` inside a
  ``CausalWanAttentionBlock``, ``peft.get_peft_model(wrapper.model, LoraConfig(...))``;
- the base checkpoint ``{"generator": wrapper.state_dict(), ...}``
  (``trainer/distillation.py:save``), the distillation LoRA checkpoint
  ``{"generator_lora", "critic_lora", "step"}`` (same function), and the KVPO checkpoint of
  ``trainer/kvpo.py:save_checkpoint`` (counters, ``generator_lora``, ``optimizer``,
  ``lr_scheduler``, ``ema`` shadow of the wrapper's trainable parameters,
  ``initial_generator_lora``), with the LoRA held in bf16 as the KVPO trainer casts it.

The oracle merges each LoRA by hand into our model's weights, ``W + alpha / r * B @ A``, reading
A and B from the peft modules of the transcribed tree (not from the saved dicts).
"""

import copy
import math

import peft
import pytest
import torch
from diffusers.optimization import get_scheduler
from torch import nn

from kvpo.models.loading import load_model
from kvpo.models.lora import import_lora
from tests.kvpo.models.reference import random_model, small_config
from tests.kvpo.models.test_loading import ORIGINAL, assert_same_weights, original_state_dict

RANK, ALPHA = 4, 8.0
LINEARS = ["self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q",
           "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2"]  # fmt: skip
TO_DIFFUSERS = {v: k for k, v in ORIGINAL.items()}


class WanRMSNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


class Attention(nn.Module):  # CausalWanSelfAttention and WanT2VCrossAttention: same parameters
    def __init__(self, dim):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = WanRMSNorm(dim), WanRMSNorm(dim)


class CausalWanAttentionBlock(nn.Module):  # the class name is what MemFlow's LoRA targets by
    def __init__(self, dim, ffn_dim):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.self_attn = Attention(dim)
        self.norm3 = nn.LayerNorm(dim)  # cross_attn_norm=True
        self.cross_attn = Attention(dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU("tanh"), nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim))


class CausalHead(nn.Module):
    def __init__(self, dim, out_dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.head = nn.Linear(dim, out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim))


class CausalWanModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        dim, patch = cfg.num_attention_heads * cfg.attention_head_dim, cfg.patch_size
        self.patch_embedding = nn.Conv3d(cfg.in_channels, dim, patch, stride=patch)
        self.text_embedding = nn.Sequential(
            nn.Linear(cfg.text_dim, dim), nn.GELU("tanh"), nn.Linear(dim, dim)
        )
        self.time_embedding = nn.Sequential(
            nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim)
        )
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(
            CausalWanAttentionBlock(dim, cfg.ffn_dim) for _ in range(cfg.num_layers)
        )
        self.head = CausalHead(dim, math.prod(patch) * cfg.out_channels)


class WanDiffusionWrapper(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.model = CausalWanModel(cfg)


def configure_lora_for_model(transformer):
    """MemFlow's utils/lora_utils.py:configure_lora_for_model for the generator."""
    targets = set()
    for name, module in transformer.named_modules():
        if module.__class__.__name__ == "CausalWanAttentionBlock":
            for full_name, sub in module.named_modules(prefix=name):
                if isinstance(sub, nn.Linear):
                    targets.add(full_name)
    config = peft.LoraConfig(
        r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(targets)
    )
    return peft.get_peft_model(transformer, config)


def _randomize_lora(wrapper, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in wrapper.named_parameters():
            if ".lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


def _lora_of(wrapper):
    """{(block, original linear): (A, B)} in fp32, read from the peft modules."""
    blocks = wrapper.model.base_model.model.blocks
    return {
        (i, t): (
            blocks[i].get_submodule(t).lora_A["default"].weight.detach().float(),
            blocks[i].get_submodule(t).lora_B["default"].weight.detach().float(),
        )
        for i in range(len(blocks))
        for t in LINEARS
    }


def _merged(model, lora):
    merged = copy.deepcopy(model)
    with torch.no_grad():
        for (i, target), (a, b) in lora.items():
            linear = merged.transformer.blocks[i].get_submodule(TO_DIFFUSERS[target])
            linear.weight += ALPHA / RANK * b @ a
    return merged


def _outputs(model):
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(2, 3, 2, 16, 16, generator=g), torch.randn(2, 4, 32, generator=g)
    with torch.no_grad():
        return model(x, torch.tensor([800.0, 200.0]), model.encode_text(text))


@pytest.fixture(scope="module")
def memflow(tmp_path_factory):
    """Our random model, and MemFlow's checkpoints of the same weights plus LoRA, on disk."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("memflow")
    model = random_model()
    wrapper = WanDiffusionWrapper(small_config())
    wrapper.model.load_state_dict(original_state_dict(model), strict=True)
    torch.save({"generator": wrapper.state_dict(), "step": 0}, root / "base.pt")

    wrapper.model = configure_lora_for_model(wrapper.model)
    _randomize_lora(wrapper, seed=1)
    wrapper.to(torch.bfloat16)  # trainer/kvpo.py: self.generator.to(dtype=self.dtype)
    initial = copy.deepcopy(wrapper)
    critic = copy.deepcopy(wrapper)  # fake_score's LoRA: same key layout, other values
    _randomize_lora(critic, seed=2)
    torch.save(
        {
            "generator_lora": peft.get_peft_model_state_dict(wrapper.model),
            "critic_lora": peft.get_peft_model_state_dict(critic.model),
            "step": 1000,
        },
        root / "lora.pt",
    )

    trainable = [p for p in wrapper.parameters() if p.requires_grad]
    ema = {n: p.detach().float().clone() for n, p in wrapper.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(trainable, lr=0.05, weight_decay=0.01)
    scheduler = get_scheduler(
        "constant_with_warmup", optimizer=optimizer, num_warmup_steps=5, num_training_steps=1500
    )
    for p in trainable:
        p.grad = torch.randn_like(p)
    optimizer.step()
    scheduler.step()
    with torch.no_grad():
        for n, p in wrapper.named_parameters():
            if n in ema:
                ema[n].mul_(0.5).add_(p.detach().float(), alpha=0.5)
    ema_wrapper = copy.deepcopy(wrapper)
    with torch.no_grad():
        for n, p in ema_wrapper.named_parameters():
            if n in ema:
                p.copy_(ema[n])
    state = {"step": 1, "_accum_count": 0, "samples_seen": 16, "rollout_count": 2}
    state.update({"samples_seen": 16, "rollout_count": 2, "world_size": 8})
    state["generator_lora"] = peft.get_peft_model_state_dict(wrapper.model)
    state["optimizer"] = optimizer.state_dict()
    state["lr_scheduler"] = scheduler.state_dict()
    state["ema"] = ema
    state["initial_generator_lora"] = peft.get_peft_model_state_dict(initial.model)
    torch.save(state, root / "checkpoint_samples_0000016.pt")
    lora = {"initial": _lora_of(initial), "trained": _lora_of(wrapper)}
    lora["ema"] = _lora_of(ema_wrapper)
    return model, root, lora


def test_the_saved_keys_are_memflows(memflow):
    _, root, _ = memflow
    base = torch.load(root / "base.pt")["generator"]
    assert "model.blocks.1.self_attn.q.weight" in base and "model.head.modulation" in base
    ckpt = torch.load(root / "checkpoint_samples_0000016.pt", weights_only=False)
    lora = ckpt["generator_lora"]
    assert len(lora) == 2 * 2 * len(LINEARS)  # 2 blocks, A and B
    assert lora["base_model.model.blocks.1.ffn.2.lora_B.weight"].dtype == torch.bfloat16
    assert "model.base_model.model.blocks.0.cross_attn.o.lora_A.default.weight" in ckpt["ema"]


def test_memflow_base_checkpoint(memflow):
    model, root, _ = memflow
    assert_same_weights(model, load_model(root / "base.pt", small_config()))


@pytest.mark.parametrize(
    "file,key,weights",
    [
        ("lora.pt", None, "initial"),  # generator_lora, not critic_lora
        ("checkpoint_samples_0000016.pt", None, "trained"),
        ("checkpoint_samples_0000016.pt", "initial_generator_lora", "initial"),
        ("checkpoint_samples_0000016.pt", "ema", "ema"),
    ],
)
def test_memflow_lora_equals_merged_weights(memflow, file, key, weights):
    model, root, lora = memflow
    expected = _outputs(_merged(model, lora[weights]))
    model = copy.deepcopy(model)
    assert import_lora(model, root / file, alpha=ALPHA, key=key) == RANK
    torch.testing.assert_close(_outputs(model), expected, atol=1e-5, rtol=1e-4)


def test_lora_on_modules_the_model_lacks_is_named(memflow):
    """An i2v MemFlow LoRA (``cross_attn.k_img``) cannot be imported into the t2v model."""
    model, root, _ = memflow
    sd = dict(torch.load(root / "lora.pt")["generator_lora"])
    sd["base_model.model.blocks.0.cross_attn.k_img.lora_A.weight"] = torch.zeros(RANK, 64)
    sd["base_model.model.blocks.0.cross_attn.k_img.lora_B.weight"] = torch.zeros(64, RANK)
    with pytest.raises(ValueError, match=r"no diffusers counterpart.*blocks\.0\.cross_attn\.k_img"):
        import_lora(copy.deepcopy(model), {"generator_lora": sd})


def test_base_checkpoint_errors_name_the_choice(memflow):
    model, root, _ = memflow
    with pytest.raises(KeyError, match="no 'generator_ema'"):
        load_model(root / "base.pt", small_config(), use_ema=True)
    with pytest.raises(KeyError, match="a LoRA checkpoint"):
        load_model(root / "lora.pt", small_config())
