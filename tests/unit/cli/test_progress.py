"""The round progress display: one line per round on a pipe, no stale test loss."""

from __future__ import annotations

import io

from conclave.cli.progress import RoundProgress


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_plain_lines_print_each_round_once_with_its_own_test_loss() -> None:
    out = io.StringIO()
    p = RoundProgress(5, stream=out, interactive=False, evaluate_every=2)
    for r in range(1, 6):
        p.round_committed(r, {"train_loss": 1.0 / r})
        if r % 2 == 0 or r == 5:
            p.evaluated(r, {"loss": 0.5 / r, "mean_accuracy": 0.1 * r})
    got = lines(out)
    assert [g.split(" | ")[0] for g in got] == [f"round   {r}/5" for r in range(1, 6)]
    assert "test loss" not in got[0] and "test loss" not in got[2]
    assert "test loss 0.2500" in got[1] and "mean acc 0.200" in got[1]
    assert "train loss 0.5000" in got[1]  # the evaluated round's line keeps its train loss
    assert "test loss 0.1000" in got[4]


def test_without_periodic_evaluation_only_the_last_round_waits_for_it() -> None:
    out = io.StringIO()
    p = RoundProgress(3, stream=out, interactive=False, evaluate_every=0)
    for r in (1, 2, 3):
        p.round_committed(r, {"train_loss": 0.3})
    assert len(lines(out)) == 2
    p.evaluated(3, {"loss": 0.7})
    assert len(lines(out)) == 3 and "test loss 0.7000" in lines(out)[-1]


def test_a_failed_attempt_is_said_once_and_the_retry_prints_the_round() -> None:
    out = io.StringIO()
    p = RoundProgress(2, stream=out, interactive=False, evaluate_every=0)
    p.round_failed(1, "fit", "quorum not reached")
    p.round_committed(1, {"train_loss": 0.4})
    got = lines(out)
    assert got[0] == "round   1/2 fit attempt failed: quorum not reached"
    assert got[1].startswith("round   1/2 | train loss 0.4000")


def test_terminal_bar_is_redrawn_in_place() -> None:
    out = io.StringIO()
    p = RoundProgress(2, stream=out, interactive=True, evaluate_every=1, width=4)
    p.round_committed(1, {"train_loss": 0.4})
    p.evaluated(1, {"loss": 0.6})
    p.round_committed(2, {})
    p.evaluated(2, {"loss": 0.5})
    text = out.getvalue()
    assert text.count("\r") == 4 and text.endswith("\n")
    assert "[####] round   2/2" in text and "test loss 0.5000" in text


def test_a_round_waiting_for_an_evaluation_that_never_comes_is_printed_at_close() -> None:
    out = io.StringIO()
    p = RoundProgress(3, stream=out, interactive=False, evaluate_every=1)
    p.round_committed(1, {"train_loss": 0.4})
    assert lines(out) == []
    p.close()  # stopped (SIGTERM) during round 1's evaluation
    assert len(lines(out)) == 1 and lines(out)[0].startswith("round   1/3 | train loss 0.4000")
    p.close()
    assert len(lines(out)) == 1
