"""``kvpo study`` end to end on a tiny toy model (random weights), with known answers.

With ``noise_injection_scale=0`` the ``noise_injection`` branches are the anchor, so every
diversity, spread and advantage difference is 0 and no branch beats the anchor, and
``kv_routing+noise`` is ``kv_routing`` bit for bit. Branches that are unrouted (the noise modes)
replay their own trajectories, so their old-policy TVE energy is 0 (to rounding). The anchor is the
same video in every mode. Attention masses over the roles sum to 1 in every layer.
"""

import json
import math

import pytest

from kvpo.study.command import main
from tests.kvpo.trainer_fixtures import TINY_OVERRIDES, tiny_generator_dir


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    weights = tiny_generator_dir(tmp_path_factory.mktemp("tiny_generator"))
    out = tmp_path_factory.mktemp("study")
    overrides = [*TINY_OVERRIDES, f"generator_ckpt={weights}", "noise_injection_scale=0",
                 "noise_inject_at_steps=[1]"]  # fmt: skip
    assert main(["--prompts", "1", "--seeds", "2", "--out", str(out), *overrides]) == 0
    return out, json.loads((out / "study.json").read_text())


def test_writes_table_json_plots_and_grids(study):
    out, record = study
    modes = ["kv_routing", "noise_injection", "initial_noise", "kv_routing+noise"]
    grids = [f"branches_{m.replace('+', '_')}.png" for m in modes]
    for name in ["study.md", "diversity_vs_manifold.png", "attention_mass.png", *grids]:
        assert (out / name).stat().st_size > 0, name
    text = (out / "study.md").read_text()
    assert "| pixel difference between branches (% of full scale) |" in text
    assert record["settings"]["modes"] == modes
    assert all(len(groups) == 2 for groups in record["groups"].values())


def test_unperturbed_branches_have_no_diversity_and_no_signal(study):
    _, record = study
    agg = record["aggregates"]["noise_injection"]
    for key in ("diversity/pixel", "diversity/latent_l2", "diversity/pixel_to_anchor",
                "semantic/presence", "semantic/position", "signal/reward_std_local",
                "signal/reward_std_global"):  # fmt: skip
        assert agg[key]["mean"] == 0.0, key
    assert agg["signal/energy_mean"]["mean"] <= 1e-12  # rounding of other batch shapes only
    assert agg["signal/all_advantages_equal"]["mean"] == 1.0
    assert agg["signal/no_branch_beats_anchor"]["mean"] == 1.0
    routed = record["aggregates"]["kv_routing"]
    assert routed["diversity/pixel"]["mean"] > 0 and routed["signal/energy_mean"]["mean"] > 0
    assert record["aggregates"]["kv_routing+noise"] == routed  # scale 0: the same rollouts


def test_noise_branches_replay_exactly_and_the_anchor_is_shared(study):
    _, record = study
    groups = record["groups"]
    assert groups["initial_noise"][0]["diversity/pixel"] > 0
    assert max(g["signal/energy_mean"] for g in groups["initial_noise"]) <= 1e-12
    for key in ("manifold/anchor/render_distance", "manifold/anchor/valid_share"):
        values = {g[key] for mode in groups.values() for g in mode[:1]}
        assert len(values) == 1, key


def test_attention_roles_sum_to_one(study):
    _, record = study
    for mode, summary in record["attention"].items():
        for rows in ("branches", "anchor"):
            roles = summary[rows]
            for layer in range(len(roles["self"])):
                total = sum(roles[r][layer] for r in ("sink", "middle", "nearest", "self"))
                assert total == pytest.approx(1.0, abs=1e-4), (mode, rows, layer)
    anchor = record["attention"]["kv_routing"]["anchor"]
    assert record["attention"]["noise_injection"]["branches"] == anchor  # unperturbed branches
    assert record["attention"]["kv_routing"]["branches"]["middle"] != anchor["middle"]


def test_routed_content_change_pairs_routed_with_replaced_frames():
    """Toy geometry, fork 9: the default view holds 3..5 | 6, 7, 8 (m = 4: 8 and the block), so
    R_g stands in for frames 6 and 7. Frame f is filled with f / 10: the RMS difference of R_g =
    (3, 5) against (6, 7) is sqrt(((0.3)^2 + (0.2)^2) / 2), of (4, 7): 0.2 and 0 -> sqrt(0.02)."""
    from types import SimpleNamespace

    import torch

    from kvpo.method.routing import RoutingGeometry, RoutingPlan
    from kvpo.models import CachePolicy
    from kvpo.study.groups import _routed_content_change

    geometry = RoutingGeometry(3, 3, 9, 24, 4, 2)
    plan = RoutingPlan(0, 0, 0, "dispersed", geometry, 1, 9, 3, 6, 1, [[3, 5], [4, 7]])
    frames = torch.arange(24, dtype=torch.float64).div(10)
    latents = frames.view(1, 1, 24, 1, 1).expand(2, 3, 24, 2, 2)
    stream = SimpleNamespace(
        frames_per_block=3, cache=SimpleNamespace(policy=CachePolicy(3, 9, 24))
    )
    got = _routed_content_change(
        SimpleNamespace(stream=stream), SimpleNamespace(plan=plan, latents=latents)
    )
    want = (math.sqrt((0.09 + 0.04) / 2) + math.sqrt(0.04 / 2)) / 2
    assert got == pytest.approx(want, rel=1e-12)


def test_kvpo_command_runs_the_study_job(capsys):
    from kvpo import cli

    assert cli.JOBS["study"][0] == "kvpo.study.command"
    with pytest.raises(SystemExit) as stop:
        cli.main(["study", "--help"])
    assert stop.value.code == 0
    assert "--train-steps" in capsys.readouterr().out
    assert main(["--modes", "kv_routing,bogus"]) == 2
