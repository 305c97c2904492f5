"""The benchmark's before/after judgement: a tree against its baseline, round by round."""

from __future__ import annotations

from typing import Any

import pytest

from tools.bench import Sample, Target, print_round_differences, round_differences


def phase(*latencies_ms: float) -> dict[str, Any]:
    """One measured phase as the load generator reports it (latencies in seconds)."""
    return {"latencies": [ms / 1000.0 for ms in latencies_ms], "tags": ["200"] * len(latencies_ms), "wall": 1.0,
            "cpu_seconds": 0.0, "client_cpu_seconds": 0.0, "error_count": 0, "errors": [], "statuses": {}}


def sample(*rounds: tuple[float, ...]) -> Sample:
    result = Sample()
    for latencies in rounds:
        result.add(phase(*latencies))
    return result


def test_each_round_keeps_its_own_median() -> None:
    s = sample((50.0, 52.0, 54.0), (60.0, 61.0, 62.0))
    assert s.round_p50s == pytest.approx([52.0, 61.0])
    assert len(s.latencies) == 6


def test_differences_are_paired_round_by_round() -> None:
    """A slow round hits both trees: paired, it cancels; pooled p50s would not show that."""
    mine = sample((53.0,), (63.0,), (54.0,))
    base = sample((52.0,), (62.5,), (54.5,))
    median, low, high = round_differences(mine, base)
    assert (median, low, high) == pytest.approx((0.5, -0.5, 1.0))


def test_only_rows_with_a_baseline_twin_are_compared(capsys: pytest.CaptureFixture[str]) -> None:
    targets = [Target(name, f"http://127.0.0.1:{port}", {}) for port, name in
               enumerate(("direct", "gateway (a)", "gateway (b)", "gateway (a) at abc123"), start=1)]
    rows = [("chat", 1, [sample((51.0,), (51.0,)), sample((53.0,), (54.0,)), sample((55.0,), (55.0,)),
                         sample((52.5,), (53.0,))])]
    print_round_differences(targets, rows)
    out = capsys.readouterr().out
    assert "chat c=1, gateway (a) vs abc123: +0.75 ms (+0.50 .. +1.00) over 2 rounds" in out
    assert "gateway (b) vs" not in out


def test_no_baseline_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    targets = [Target("direct", "http://127.0.0.1:1", {}), Target("gateway (a)", "http://127.0.0.1:2", {})]
    print_round_differences(targets, [("chat", 1, [sample((51.0,)), sample((53.0,))])])
    assert capsys.readouterr().out == ""


def test_rounds_must_pair_up_and_a_round_without_answers_is_left_out() -> None:
    with pytest.raises(ValueError, match="same rounds"):
        round_differences(sample((53.0,), (54.0,)), sample((52.0,)))
    mine, base = sample((53.0,), (), (55.0,)), sample((52.0,), (52.0,), (52.0,))
    assert round_differences(mine, base) == pytest.approx((2.0, 1.0, 3.0))


def test_a_name_that_itself_contains_at_pairs_with_its_own_baseline(capsys: pytest.CaptureFixture[str]) -> None:
    targets = [Target(name, f"http://127.0.0.1:{port}", {}) for port, name in
               enumerate(("direct", "gateway (a) at rest", "gateway (a) at rest at f00ba47"), start=1)]
    rows = [("chat", 1, [sample((51.0,)), sample((53.0,)), sample((52.0,))])]
    print_round_differences(targets, rows)
    assert "chat c=1, gateway (a) at rest vs f00ba47: +1.00 ms" in capsys.readouterr().out


CALLGRIND_CONTROL = """PID 9490: .venv/bin/python .venv/bin/gunicorn -c gunicorn.conf.py wsgi:app
sending command status internal to pid 9490

  Totals:           Ir
   Th 1  2,100,476,701

   Th 2         30,949
   Th 3        105,566
"""


def test_callgrind_counters_are_summed_over_threads() -> None:
    from tools.bench_instructions import total_instructions

    assert total_instructions(CALLGRIND_CONTROL) == 2_100_476_701 + 30_949 + 105_566
    with pytest.raises(SystemExit, match="no counters"):
        total_instructions("PID 1: no such process\n")
