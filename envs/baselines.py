"""Published SIMPLER success rates (%, Google robot), from SimplerEnv's metrics and the CogACT paper.

Keys: policy -> task group -> protocol -> percent (None where not published). The drawer entry is the
average of open and close drawer, as SimplerEnv reports it.
"""

from __future__ import annotations

TASK_GROUPS = {  # our task names -> the published column they compare with
    "pick_coke_can": "pick_coke_can",
    "move_near": "move_near",
    "open_drawer": "drawer",
    "close_drawer": "drawer",
    "place_apple_in_drawer": "place_apple_in_drawer",
}


def _row(coke, near, drawer, apple):
    return {
        "pick_coke_can": {"visual_matching": coke[0], "variant_aggregation": coke[1]},
        "move_near": {"visual_matching": near[0], "variant_aggregation": near[1]},
        "drawer": {"visual_matching": drawer[0], "variant_aggregation": drawer[1]},
        "place_apple_in_drawer": {"visual_matching": apple[0], "variant_aggregation": apple[1]},
    }


BASELINES: dict[str, dict[str, dict[str, float | None]]] = {
    "RT-1": _row((85.7, 89.8), (44.2, 50.0), (73.0, 32.3), (6.5, 2.6)),
    "RT-1-X": _row((56.7, 49.0), (31.7, 32.3), (59.7, 29.4), (21.3, 10.1)),
    "RT-2-X": _row((78.7, 82.3), (77.9, 79.2), (25.0, 35.3), (3.7, 20.6)),
    "Octo-Base": _row((17.0, 0.6), (4.2, 3.1), (22.7, 1.1), (0.0, None)),
    "OpenVLA": _row((18.0, 60.8), (56.3, 67.7), (63.0, 28.8), (0.0, 0.0)),
    "CogACT": _row((91.3, 89.6), (85.0, 80.8), (71.8, 28.3), (50.9, 46.6)),
}


def baseline(policy: str, task: str, protocol: str) -> float | None:
    """Published success rate in percent, or None; task is one of ours (drawer tasks share one column)."""
    if policy not in BASELINES:
        raise ValueError(f"unknown baseline {policy!r}; known: {list(BASELINES)}")
    group = TASK_GROUPS.get(task, task)
    return BASELINES[policy].get(group, {}).get(protocol)
