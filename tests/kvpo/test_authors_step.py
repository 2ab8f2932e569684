"""One training step from each of the KVPO authors' YAML files, end to end on the CPU.

``tests/kvpo/fixtures/authors/train_kvpo_{longlive,memflow}.yaml`` (every key and value of
their ``configs/train_kvpo_*.yaml``) go through ``python -m kvpo.train`` (:func:`kvpo.train.main`,
in this process) unchanged but for ``key=value`` overrides of this project's keys:

- paths (their files name checkpoints, prompts and the Wan directory on their machines):
  ``generator_ckpt``, ``lora_ckpt``, ``wan_model_path``, ``data_path``, ``output_dir``,
  ``run_name``; ``reward_path`` / ``reward_base_model`` (their code finds HPSv3 itself);
- ``dtype=float32``: their trainer runs bfloat16, which a CPU runs slowly and inexactly;
- sizes, for one CPU core: a 12-frame video (15 for MemFlow, whose routing needs a fork past
  the first eligible block to draw distinct contexts; ``streaming_max_length`` 147 -> 12,
  ``streaming_chunk_size`` 21 -> 6, ``streaming_min_new_frame`` 18 -> 3, ``slice_last_frames``
  21 -> 6, ``model_kwargs.local_attn_size`` 12 -> 9, ``switch_frame_indices`` 39, 75, 111 ->
  3, 6, 9: their 4 prompt segments stay), ``perturb_num_blocks`` 5 -> 1, ``K`` 8 -> 2,
  ``long_reward_normal_clip_len`` 36 -> 4 pixel frames, ``eval_prompts`` world_size (8) -> 1,
  ``max_train_steps`` 1500 -> 1 and ``sync_every`` (their ``gradient_accumulation_steps``)
  2 -> 1, so that the run is one rollout and one update.

Everything else is theirs: 4 denoising steps with their shift, sink 3, their m nearest frames,
LoRA rank and alpha 256, the lr schedule, AdamW, clip ranges, KL, EMA, HPSv3 as the reward and
their ``reward_batch_size`` / ``eval_reward_components``. The checkpoints, the Wan directory,
the prompt file and HPSv3 are tiny random models in the released formats
(:mod:`tests.kvpo.authors_artifacts`). The test asserts what the run wrote: the metrics row, the
update's size against AdamW's first step, the checkpoint (resumed) and the exported adapter.
"""

import json
import math
import re
from pathlib import Path

import pytest
import torch

from kvpo import KVPOTrainer
from kvpo.models.loading import load_model
from kvpo.models.lora import import_lora, lora_parameters
from kvpo.train import main
from kvpo.training.config_parse import load_config
from kvpo.training.distributed import DistInfo
from tests.kvpo.authors_artifacts import (
    write_checkpoints,
    write_prompts,
    write_small_hpsv3,
    write_wan_dir,
)
from tests.kvpo.models.conftest import _one_thread  # noqa: F401  (autouse fixture)

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "authors"
SIZES = [
    "dtype=float32", "streaming_max_length=12", "streaming_chunk_size=6",
    "streaming_min_new_frame=3", "slice_last_frames=6", "model_kwargs.local_attn_size=9",
    "switch_frame_indices=3, 6, 9", "perturb_num_blocks=1", "K=2",
    "long_reward_normal_clip_len=4", "eval_prompts=1", "max_train_steps=1", "sync_every=1",
    "show_progress=false",
]  # fmt: skip
# MemFlow's routing draws local_attn_size - m of the min(fork, cache) - m cache slots: at 12
# frames its only eligible fork (frame 9) leaves one draw, so both branches would be the same
# context and the advantages 0; 15 frames put the seeded fork at 12 (distinct branches)
KIND_SIZES = {"longlive": [], "memflow": ["streaming_max_length=15"]}
KEYS = {"longlive": 100, "memflow": 105}  # every key of their file has its row


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """The Wan directory, the prompt file and HPSv3, shared by both runs."""
    root = tmp_path_factory.mktemp("authors_shared")
    hpsv3, base = write_small_hpsv3(root / "hpsv3")
    return [
        f"wan_model_path={write_wan_dir(root / 'Wan2.1-T2V-1.3B')}",
        f"data_path={write_prompts(root / 'prompts.txt')}",
        f"reward_path={hpsv3}",
        f"reward_base_model={base}",
    ]


@pytest.mark.parametrize("kind", ["longlive", "memflow"])
def test_one_training_step_from_the_authors_yaml(kind, shared, tmp_path, capsys):
    generator, lora = write_checkpoints(tmp_path / "checkpoints", kind, rank=256, alpha=256)
    args = [
        "--config", str(FIXTURES / f"train_kvpo_{kind}.yaml"), f"generator_ckpt={generator}",
        f"lora_ckpt={lora}", *shared, f"output_dir={tmp_path / 'runs'}", f"run_name={kind}",
        *SIZES, *KIND_SIZES[kind],
    ]  # fmt: skip
    assert main([*args, "--check"]) == 0
    checked = capsys.readouterr().out
    counts = re.search(r"(\d+) keys in the file: (\d+) mapped, (\d+) no effect here, (\d+) not "
                       "implemented here", checked)  # fmt: skip
    assert int(counts[1]) == KEYS[kind] == sum(int(n) for n in counts.groups()[1:])
    assert "reward_videos_per_call = 4" in checked  # their reward_batch_size
    assert "eval_reward_components = [{'name': 'video_hpsv3', 'weight': 1.0}]" in checked

    assert main(args) == 0
    run = tmp_path / "runs" / kind
    cfg = load_config(run / "config.yaml")
    assert (cfg.K, cfg.adapter.rank, cfg.adapter.alpha, cfg.reward_model) == (
        2, 256, 256.0, "video_hpsv3",
    )  # fmt: skip
    (row,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert (row["step"], row["train_step"]) == (0, 0) and "skipped" not in row
    assert math.isfinite(row["loss"]) and row["grad_norm"] > 0
    for signal in ("local", "global"):
        branches = row[f"reward_{signal}/video_hpsv3/branches"]
        assert len(branches) == 2 and all(math.isfinite(r) for r in branches)
    # their constant_with_warmup over 5 steps; the first step here runs at 1/5 of lr (theirs at
    # 0: docs/reference-differences.md)
    lr = row["lr"]
    assert lr == pytest.approx(1e-5 / 5, rel=1e-12)

    # held-out evaluation: their eval_reward_components, one prompt, before and after
    for tag in ("before", "after"):
        scores = json.loads((run / f"eval_{tag}.json").read_text())
        assert list(scores) == ["video_hpsv3"] and math.isfinite(scores["video_hpsv3"][0])
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["steps"], summary["rollouts"], summary["skipped"]) == (1, 1, 0)
    assert [s["name"] for s in summary["heldout"]] == ["video_hpsv3", "total"]

    # the checkpoint resumes; the LoRA moved by AdamW's first step from where a new run starts:
    # |delta + lr wd p| = lr |g| / (|g| + eps) <= lr (no clipping: grad_norm < max_grad_norm),
    # above lr / 2 where the largest gradient entry exceeds eps = 1e-8 (the tiny models' gradients
    # are small: MemFlow's largest gives 0.72 lr)
    cfg.run_name = f"{kind}-fresh"
    fresh = KVPOTrainer(cfg, info=DistInfo()).learner
    resumed = KVPOTrainer(load_config(run / "config.yaml"), resume=str(run), info=DistInfo())
    trained = resumed.learner
    assert (trained.counters.step, trained.counters.rollouts) == (1, 1)
    assert set(trained.named_params) == set(fresh.named_params)
    steps = []
    for name, p in trained.named_params.items():
        start = fresh.named_params[name].detach()
        step = (p.detach() - start + lr * cfg.weight_decay * start).abs().max().item()
        assert torch.isfinite(p).all() and step <= lr * (1 + 1e-3), name
        steps.append(step)
    assert row["grad_norm"] < cfg.max_grad_norm and 0.5 * lr < max(steps) <= lr * (1 + 1e-3)

    # the exported adapter (peft format) holds the trained weights
    model = load_model(generator)
    import_lora(model, run / "adapter" / "adapter_model.safetensors", adapter="default")
    exported = lora_parameters(model, "default")
    assert set(exported) == set(trained.named_params)
    for name, p in exported.items():
        torch.testing.assert_close(p.detach(), trained.named_params[name].detach())
