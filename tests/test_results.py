"""Wilson intervals, SimplerEnv-style aggregation, result files, the task registry's official grids."""

from __future__ import annotations

import json

import numpy as np
import pytest

from envs.backend import get_task, resolve_episodes, task_names
from envs.results import EpisodeRecord, aggregate, markdown_table, wilson_interval, write_results
from envs.tasks import robot_init_quat, simpler_episodes


def test_wilson_known_values():
    np.testing.assert_allclose(wilson_interval(8, 10), (0.4902, 0.9433), atol=1e-4)
    np.testing.assert_allclose(wilson_interval(0, 10), (0.0, 0.2775), atol=1e-4)
    np.testing.assert_allclose(wilson_interval(10, 10), (0.7225, 1.0), atol=1e-4)
    np.testing.assert_allclose(wilson_interval(50, 100), (0.4038, 0.5962), atol=1e-4)
    with pytest.raises(ValueError):
        wilson_interval(0, 0)
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def _recs(task, protocol, per_variant):
    out, i = [], 0
    for variant, succ in per_variant.items():
        for s in succ:
            out.append(EpisodeRecord(task, protocol, variant, i, None, s))
            i += 1
    return out


def test_aggregation_is_mean_of_variant_means():
    recs = _recs("move_near", "visual_matching", {"urdf=None": [1, 1, 0, 0], "urdf=r1": [1, 0]})
    e = aggregate(recs)["move_near/visual_matching"]
    assert e["variants"]["urdf=None"]["rate"] == 0.5 and e["variants"]["urdf=r1"]["rate"] == 0.5
    recs = _recs("pick_coke_can", "variant_aggregation", {"a": [1, 1, 1, 1], "b": [0, 0], "c": [1, 0]})
    e = aggregate(recs)["pick_coke_can/variant_aggregation"]
    assert e["success_rate"] == pytest.approx((1.0 + 0.0 + 0.5) / 3)
    assert e["pooled"]["k"] == 5 and e["pooled"]["n"] == 8 and e["episodes"] == 8
    lo, hi = wilson_interval(5, 8)
    assert e["pooled"]["ci_low"] == pytest.approx(lo) and e["pooled"]["ci_high"] == pytest.approx(hi)


def test_failed_record_blocks_aggregation(tmp_path):
    recs = _recs("move_near", "visual_matching", {"v": [1, None]})
    recs[1].error = "boom"
    with pytest.raises(ValueError, match="failed"):
        aggregate(recs)
    paths = write_results(recs, tmp_path)
    assert "summary_json" not in paths and (tmp_path / "episodes.csv").read_text().count("\n") == 3


def test_files_and_markdown(tmp_path):
    recs = _recs("open_drawer", "visual_matching", {"x": [1, 0]}) + _recs("close_drawer", "visual_matching",
                                                                          {"x": [1, 1]})
    paths = write_results(recs, tmp_path, meta={"seed": 0})
    md = paths["results_md"].read_text()
    assert "| open_drawer | visual_matching | 50.0 [" in md and "n=2" in md
    assert "drawer (open/close mean) | visual_matching | 75.0 (n=4)" in md
    assert "73.0" in md and "CogACT" in md  # RT-1 drawer baseline beside ours
    assert json.loads(paths["summary_json"].read_text())["meta"]["seed"] == 0
    assert "pick_coke_can" not in markdown_table(aggregate(recs))


def test_registry_grids_match_official_sizes():
    sizes = {("move_near", "visual_matching"): 240, ("pick_coke_can", "visual_matching"): 300,
             ("open_drawer", "visual_matching"): 108, ("place_apple_in_drawer", "visual_matching"): 108,
             ("move_near", "variant_aggregation"): 480, ("close_drawer", "variant_aggregation"): 189}
    for (t, p), n in sizes.items():
        assert len(simpler_episodes(t, p)) == n, (t, p)
    s = simpler_episodes("move_near", "visual_matching")
    assert {x.variant for x in s} == {"urdf=None", "urdf=recolor_tabletop_visual_matching_1",
                                      "urdf=recolor_tabletop_visual_matching_2",
                                      "urdf=recolor_cabinet_visual_matching_1"}
    e = s[61]
    assert e.env_id == "MoveNearGoogleBakedTexInScene-v0" and e.max_steps == 80
    assert e.make_kwargs["scene_name"] == "google_pick_coke_can_1_v4"
    assert e.make_kwargs["rgb_overlay_path"].endswith("google_move_near_real_eval_1.png")
    assert e.reset_options["robot_init_options"]["init_xy"] == [0.35, 0.21]
    assert e.reset_options["obj_init_options"] == {"episode_id": 1}
    json.dumps([x.to_dict() for x in s])  # specs travel to workers as JSON-able dicts


def test_robot_init_quat_convention():
    # yaw -0.09 times the scripts' center (w=0, z=1: a half turn about z) -> a rotation of pi - 0.09 about z
    q = robot_init_quat(0, 0, -0.09)
    np.testing.assert_allclose(q, [np.sin(0.045), 0, 0, np.cos(0.045)], atol=1e-12)
    np.testing.assert_allclose(robot_init_quat(0, 0, 0), [0, 0, 0, 1], atol=1e-12)


def test_registry_errors_and_selection():
    assert {"move_near", "pick_coke_can", "open_drawer", "close_drawer", "place_apple_in_drawer"} <= set(task_names())
    with pytest.raises(ValueError, match="valid tasks: .*move_near"):
        get_task("move_far")
    with pytest.raises(ValueError, match="no protocol"):
        resolve_episodes("move_near", "real_world")
    few = resolve_episodes("move_near", "visual_matching", 8)
    assert len(few) == 8 and len({x.variant for x in few}) == 4  # short runs cover every variant
