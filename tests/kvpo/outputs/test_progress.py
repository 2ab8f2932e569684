"""Progress lines off a terminal and the tqdm bar on one (kvpo.outputs.progress)."""

import io

from kvpo.outputs.progress import Progress, format_duration, format_value


class Clock:
    """Seconds that the test sets."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_format_duration_and_values():
    assert [format_duration(s) for s in (0, 44.6, 204, 3599.4, 7500)] == [
        "0s",
        "45s",
        "3m24s",
        "59m59s",
        "2h05m",
    ]
    assert [format_value(v) for v in (0.51234, 0.012345, 123.456, 3, "x")] == [
        "0.512",
        "0.0123",
        "123",
        "3",
        "x",
    ]


def test_plain_lines_every_n_steps_without_carriage_returns():
    stream, clock = io.StringIO(), Clock()
    progress = Progress(total=10, every=3, stream=stream, clock=clock)
    for step in range(1, 11):
        clock.now = 100.0 + 3.4 * step
        progress.update(step, reward=0.5 + step / 100, loss=0.0123, note=None)
        if step == 5:
            progress.write("step 5 skipped: non-finite loss")
    with progress.phases(["rollout", "update"]) as bar:
        assert bar is None
    progress.close()
    assert stream.getvalue().split("\n") == [
        "step 3/10  reward 0.53  loss 0.0123  3.4 s/step  eta 24s",
        "step 5 skipped: non-finite loss",
        "step 6/10  reward 0.56  loss 0.0123  3.4 s/step  eta 14s",
        "step 9/10  reward 0.59  loss 0.0123  3.4 s/step  eta 3s",
        "step 10/10  reward 0.6  loss 0.0123  3.4 s/step  eta 0s",
        "",
    ]
    assert "\r" not in stream.getvalue()


def test_resumed_run_times_only_its_own_steps():
    stream, clock = io.StringIO(), Clock()
    progress = Progress(total=100, initial=37, every=10, stream=stream, clock=clock)
    for step in (38, 39, 40):
        clock.now = 100.0 + 2.0 * (step - 37)
        progress.update(step, loss=1.5)
    assert stream.getvalue() == "step 40/100  loss 1.5  2 s/step  eta 2m00s\n"


def test_terminal_gets_tqdm_bars():
    stream = Terminal()
    progress = Progress(total=4, every=100, stream=stream)
    with progress.phases(["rollout", "rewards", "update"], desc="step 0") as bar:
        assert bar.total == 3
        bar.update(3)
    for step in range(1, 5):
        progress.update(step, reward=0.25)
    progress.write("hello")
    progress.close()
    out = stream.getvalue()
    assert "\r" in out and "4/4" in out and "reward=0.25" in out and "hello\n" in out
    assert "step 4/4" not in out  # no plain lines on a terminal


def test_disabled_prints_nothing():
    for stream in (io.StringIO(), Terminal()):
        progress = Progress(total=3, every=1, enabled=False, stream=stream)
        with progress.phases(["a"]) as bar:
            assert bar is None
        progress.update(1, loss=1.0)
        progress.write("x")
        progress.close()
        assert stream.getvalue() == ""
