"""The memory planner at the paper's settings (kvpo.planning): parameter counts of the real
modules built on the meta device, the choice of ``row_micro_batch`` on limits just above / below
computed peaks, what does not fit and which option would, the recache / bank / try_kl phases at
LongLive's and MemFlow's settings, reward models by name, the sizes and the ``kvpo plan``
command. Measured predictions: tests/kvpo/test_memory_plan.py.
"""

import dataclasses

import pytest
import torch

from kvpo.models import CausalWan
from kvpo.models.config import WAN_1_3B
from kvpo.models.lora import add_lora
from kvpo.planning import choose_row_micro_batch, parse_size, plan_memory, usable_bytes
from kvpo.planning.choose import CONTEXT_BYTES, FRAGMENTATION, start_config
from kvpo.planning.components import lora_parameters
from kvpo.planning.externals import Setup
from kvpo.planning.kv import bank_pages, pool_pages
from kvpo.planning.sizes import SizeError
from kvpo.training.config_parse import load_config, resolved_dtype


def test_parameter_counts_match_the_modules():
    from transformers import Qwen2VLConfig, Qwen2VLModel, UMT5Config, UMT5EncoderModel

    from kvpo.planning.components import (
        QWEN2_VL_2B,
        QWEN2_VL_7B,
        qwen2vl_parameters,
        umt5_encoder_parameters,
    )

    def count(module_fn):
        with torch.device("meta"):
            return sum(p.numel() for p in module_fn().parameters())

    umt5 = UMT5Config(
        vocab_size=256384, d_model=4096, d_ff=10240, num_layers=24, num_heads=64, d_kv=64,
        feed_forward_proj="gated-gelu",
    )  # fmt: skip
    assert umt5_encoder_parameters() == count(lambda: UMT5EncoderModel(umt5)) == 5_680_910_336
    for shape, expected in ((QWEN2_VL_7B, 7_746_378_240), (QWEN2_VL_2B, 2_208_985_600)):
        text = {k: getattr(shape, k) for k in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads")}  # fmt: skip
        vision = dict(depth=32, embed_dim=1280, hidden_size=shape.hidden_size, num_heads=16)
        config = Qwen2VLConfig(text_config=text, vision_config=vision)
        assert qwen2vl_parameters(shape) == count(lambda c=config: Qwen2VLModel(c)) == expected
    with torch.device("meta"):
        model = CausalWan.from_config(WAN_1_3B, device="meta")
        add_lora(model, 256)
    lora = sum(p.numel() for n, p in model.transformer.named_parameters() if ".lora_" in n)
    assert lora == lora_parameters(WAN_1_3B, 256) == 349_962_240


# ---------------------------------------------------------------------- the choice
@pytest.fixture(scope="module")
def longlive():
    cfg = load_config("configs/longlive.yaml", ["row_micro_batch=0"])
    return cfg, Setup(WAN_1_3B, "bfloat16", "cuda", True, 512, "Wan2.1-T2V-1.3B")


def _total_for(usable: int) -> int:
    """The smallest device size whose usable bytes reach ``usable``."""
    total = int(usable / (1 - FRAGMENTATION)) + CONTEXT_BYTES
    while usable_bytes(total) < usable:
        total += 1
    while usable_bytes(total - 1) >= usable:
        total -= 1
    return total


@pytest.mark.parametrize("value", [0, 5, 1])
def test_choice_at_the_edge_of_a_peak(longlive, value):
    cfg, setup = longlive
    peak = plan_memory(cfg, setup, value).peak[1]
    at = choose_row_micro_batch(cfg, _total_for(peak), setup)
    assert at.fits and at.row_micro_batch == value and at.plan.peak[1] == peak
    below = choose_row_micro_batch(cfg, _total_for(peak) - 1, setup, explain=False)
    expected = {0: 8, 5: 4, 1: 1}[value]
    assert below.row_micro_batch == expected and below.fits == (value != 1)


def test_what_does_not_fit_and_which_option_would(longlive):
    cfg, setup = longlive
    plain = dataclasses.replace(cfg, gradient_checkpointing=False)
    with_ckpt = plan_memory(cfg, setup, 1)
    without = plan_memory(plain, setup, 1)
    assert without.peak[0] == "replay_grad" and without.peak[1] > with_ckpt.peak[1]
    choice = choose_row_micro_batch(plain, _total_for(with_ckpt.peak[1]), setup)
    assert not choice.fits and "even one row peaks" in choice.message
    assert [name for name, _ in choice.over] == ["replay_grad"]
    assert choice.options[0].startswith("gradient_checkpointing=true: fits at row_micro_batch=1")
    hopeless = choose_row_micro_batch(cfg, parse_size("80GiB"), setup)
    assert not hopeless.fits and "rewards: score" in hopeless.message
    assert hopeless.options[0].startswith("reward_offload=true: still does not fit")
    assert hopeless.options[-1].startswith("no configuration option makes it fit")
    assert "decoded videos of this step (fp32) 23.50 GiB" in hopeless.options[-1]


def test_recache_bank_and_try_kl_at_the_papers_settings(longlive):
    """At Wan-1.3B scale: the switch recache (12 frames, one pass) is the rollout's transient;
    MemFlow's pool has 18 bank pages a row plus 6 for the policy blocks; try_kl adds its phase."""
    cfg, setup = longlive
    plan = plan_memory(cfg, setup, 5)
    line = plan.phases[0].lines[-1]
    tokens = 5 * 12 * 1560
    peak = 2 * tokens * (3 * 8960 + 8 * 1536) + 5 * 12 * 6 * 1536 * 4 + 2 * 12 * 1560 * 128 * 4
    assert line.what == "recache pass at a switch, 5 rows x 12 frames" and line.bytes == peak
    assert "try_kl anchor replay" not in [p.name for p in plan.phases]
    try_kl = dataclasses.replace(cfg, kl_loss_mode="try_kl")
    anchor = next(p for p in plan_memory(try_kl, setup, 5).phases if p.name.startswith("try_kl"))
    saved = next(line for line in anchor.lines if line.what.startswith("saved activations"))
    assert saved.what.endswith("5 calls x 1 row")  # P = 5 blocks x anchor_grad_steps 1
    memflow = load_config("configs/memflow.yaml", ["row_micro_batch=0"])
    # 147 frames, a record every 9: 17 records (under 30 x (3 - 1) + 1) and the pending one
    assert bank_pages(memflow, WAN_1_3B) == 18
    for rows in (1, 5):  # resident 33 + F, per row 18 policy + 12 recache + F, bank 18 + 6
        pages = 33 + 3 + rows * (18 + 12 + 3) + (18 + 6) * (rows + 1)
        assert pool_pages(memflow, rows, WAN_1_3B) == pages
        pool = plan_memory(memflow, setup, rows).resident[5]
        assert pool.what.startswith("K/V page pool")
        assert pool.bytes == pages * 2 * 30 * 1560 * 1536 * 2  # K and V of 30 layers, bf16


def test_reward_models_by_name(longlive):
    from kvpo.planning.externals import reward_footprint

    cfg, setup = longlive
    hps = reward_footprint(cfg, setup)
    assert hps.weights == 7_746_378_240 * 2 + 4 * (3584 * 1024 + 1024 + 1024 * 16 + 16 + 34)
    align = reward_footprint(dataclasses.replace(cfg, reward_model="videoalign_mq"), setup)
    assert align.weights == 2_208_985_600 * 2 + 1536 * 2
    served = reward_footprint(
        dataclasses.replace(cfg, reward_model="http://127.0.0.1:8765/x"), setup
    )
    assert served.weights == 0 and not served.notes
    mine = dataclasses.replace(cfg, reward_model="mypkg.scorers:Aesthetic")
    assert reward_footprint(mine, setup).weights == 0
    assert (
        "'mypkg.scorers:Aesthetic' is not known to the planner" in plan_memory(mine, setup).notes[0]
    )


def test_sizes_and_the_command(capsys):
    from kvpo.cli import main as kvpo_main

    assert parse_size("80GiB") == 80 * 2**30 and parse_size("141GB") == 141 * 10**9
    assert parse_size("1.5 TiB") == int(1.5 * 2**40) and parse_size("4096") == 4096
    for bad, message in (("80XB", "unknown memory unit 'XB'"), ("lots", "cannot read"),
                         ("0GiB", "must be positive")):  # fmt: skip
        with pytest.raises(SizeError, match=message):
            parse_size(bad)
    assert kvpo_main(["plan", "--config", "configs/longlive.yaml", "--gpu-memory", "80XB"]) == 2
    assert "unknown memory unit 'XB'" in capsys.readouterr().err
    assert kvpo_main(["plan", "--gpu-memory", "8GiB", "K=4"]) == 0  # the toy run fits
    out = capsys.readouterr().out
    assert "choice: row_micro_batch=0 (all rows at once)" in out and "replay_grad" in out
    assert kvpo_main(["plan", "--gpu-memory", "80GiB", "row_micro_batch=-1"]) == 2
    assert "row_micro_batch must be an integer >= 0 or 'auto'" in capsys.readouterr().err


def test_auto_values_at_start(capsys):
    from kvpo.training.validation import validate

    cfg = load_config(None, ["row_micro_batch=auto"])
    assert (
        cfg.row_micro_batch == "auto"
        and load_config(None, ["row_micro_batch=3"]).row_micro_batch == 3
    )
    validate(cfg)
    lines = []
    resolved = start_config(cfg, "cpu", log=lines.append)
    assert resolved.row_micro_batch == 0 and len(lines) == 1 and "all 9 rows" in lines[0]
    assert cfg.rows_per_batch == 9  # auto on this CPU-only machine
    wan = dataclasses.replace(cfg, generator_ckpt="/no/such/model.pt")
    assert resolved_dtype(cfg, "cuda") == "float32" and resolved_dtype(cfg, "cpu") == "float32"
    assert resolved_dtype(wan, "cuda") == "bfloat16" and resolved_dtype(wan, "cpu") == "float32"
    assert resolved_dtype(dataclasses.replace(wan, dtype="float16"), "cuda") == "float16"
    lines = []
    start_config(dataclasses.replace(cfg, row_micro_batch=2), "cuda", log=lines.append)
    assert lines == [
        "dtype float32 on a GPU: routed attention runs in IEEE fp32, without tensor cores "
        "(dtype=bfloat16, or auto for a Wan checkpoint)"
    ]
