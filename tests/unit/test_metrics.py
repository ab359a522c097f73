"""The meter on recorded event sequences, with a fake clock: no sockets."""

import base64
import time
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry

from relay.ops.config import PriceTable
from relay.ops.metrics import (
    BatchedHistogram,
    CountedHistogram,
    Metrics,
    SessionMeter,
    label_for_type,
)
from relay.session.codec import base64_size


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def sample(metrics: Metrics, name: str, labels: dict) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def ev(kind, **fields) -> bytes:
    return orjson.dumps({"type": kind, **fields})


def audio(nbytes: int) -> str:
    return base64.b64encode(b"\0" * nbytes).decode()


USAGE = {
    "total_tokens": 82,
    "input_tokens": 5,
    "output_tokens": 77,
    "input_token_details": {
        "cached_tokens": 2,
        "text_tokens": 5,
        "audio_tokens": 0,
        "image_tokens": 0,
    },
    "output_token_details": {"text_tokens": 21, "audio_tokens": 56},
}


@pytest.fixture
def meter():
    return SessionMeter(Metrics.create(CollectorRegistry()), "team-a", "gpt-rt", clock=Clock())


def feed(meter: SessionMeter, direction: str, frame: bytes, at: float | None = None):
    if at is not None:
        meter.clock.now = at
    kind = orjson.loads(frame)["type"]
    if direction == "in":
        meter.client_event(kind, frame, base64_size(frame, b"audio"))
    else:
        meter.upstream_event(kind, frame)


def test_a_voice_turn(meter):
    m = meter.metrics
    meter.session_changed(
        {
            "audio": {
                "input": {"format": {"type": "audio/pcm", "rate": 24000}},
                "output": {"format": {"type": "audio/pcmu"}},
            }
        }
    )
    for _ in range(50):  # 50 x 20 ms of 24 kHz PCM16 = 1 s
        feed(meter, "in", ev("input_audio_buffer.append", audio=audio(960)))
    feed(
        meter,
        "out",
        ev("input_audio_buffer.speech_stopped", item_id="i", audio_end_ms=1000),
        at=101.0,
    )
    feed(meter, "out", ev("input_audio_buffer.committed", item_id="i"), at=101.1)
    feed(meter, "out", ev("response.created", response={}), at=101.2)
    # 2 s of G.711 (8000 bytes/s) out, in 4 chunks
    feed(
        meter,
        "out",
        ev("response.output_audio.delta", delta=audio(4000), response_id="r"),
        at=101.35,
    )
    for _ in range(3):
        feed(meter, "out", ev("response.output_audio.delta", delta=audio(4000), response_id="r"))
    feed(
        meter,
        "out",
        ev("response.done", response={"status": "completed", "usage": USAGE}),
        at=103.2,
    )
    meter.flush()

    td = {"team": "team-a", "deployment": "gpt-rt"}
    ttfa = {**td, "backend": "default"}
    # Time to first audio counts from speech_stopped (the earliest end-of-turn mark).
    assert sample(m, "relay_time_to_first_audio_seconds_sum", ttfa) == pytest.approx(0.35)
    assert sample(m, "relay_time_to_first_audio_seconds_count", ttfa) == 1
    assert sample(m, "relay_response_duration_seconds_sum", td) == pytest.approx(2.0)
    assert sample(m, "relay_audio_seconds_total", {"direction": "in", **td}) == pytest.approx(1.0)
    assert sample(m, "relay_audio_seconds_total", {"direction": "out", **td}) == pytest.approx(2.0)
    assert sample(m, "relay_audio_chunk_bytes_count", {"direction": "in"}) == 50
    assert sample(m, "relay_audio_chunk_bytes_sum", {"direction": "in"}) == 50 * 960
    assert (
        sample(m, "relay_events_total", {"direction": "in", "type": "input_audio_buffer.append"})
        == 50
    )
    assert (
        sample(m, "relay_events_total", {"direction": "out", "type": "response.output_audio.delta"})
        == 4
    )
    assert sample(m, "relay_tokens_total", {**td, "kind": "output_audio"}) == 56
    # No cached_tokens_details (as in the preview protocol): the cached tokens are text.
    assert sample(m, "relay_tokens_total", {**td, "kind": "input_cached_text"}) == 2
    assert sample(m, "relay_responses_total", {**td, "status": "completed"}) == 1
    assert meter.tokens["output_text"] == 21
    assert meter.audio_seconds_total == {"in": pytest.approx(1.0), "out": pytest.approx(2.0)}
    assert meter.frames_total == {"in": 50, "out": 8}


def test_response_create_marks_the_turn_end_without_vad(meter):
    feed(meter, "in", ev("response.create"), at=10.0)
    feed(meter, "out", ev("response.created", response={}), at=10.1)
    feed(meter, "out", ev("response.output_audio.delta", delta=audio(480)), at=10.5)
    feed(meter, "out", ev("response.output_audio.delta", delta=audio(480)), at=11.0)
    td = {"team": "team-a", "deployment": "gpt-rt", "backend": "default"}
    assert sample(meter.metrics, "relay_time_to_first_audio_seconds_sum", td) == pytest.approx(0.5)
    assert sample(meter.metrics, "relay_time_to_first_audio_seconds_count", td) == 1


def test_preview_names_and_formats(meter):
    meter.session_changed({"input_audio_format": "g711_alaw", "output_audio_format": "pcm16"})
    feed(meter, "in", ev("input_audio_buffer.append", audio=audio(8000)))
    feed(meter, "out", ev("response.audio.delta", delta=audio(48000)))
    meter.flush()
    assert meter.audio_seconds_total == {"in": pytest.approx(1.0), "out": pytest.approx(1.0)}


def test_upstream_errors_and_unknown_types_keep_labels_bounded(meter):
    meter.upstream_error("invalid_value", "invalid_request_error")
    meter.upstream_error("some-new-code-" + "x" * 40, "x")
    meter.upstream_error(None, "server_error")
    feed(meter, "out", ev("vendor.custom_event"))
    meter.flush()
    m = meter.metrics
    assert (
        sample(
            m,
            "relay_upstream_error_events_total",
            {"deployment": "gpt-rt", "code": "invalid_value"},
        )
        == 1
    )
    assert (
        sample(m, "relay_upstream_error_events_total", {"deployment": "gpt-rt", "code": "other"})
        == 1
    )
    assert (
        sample(
            m,
            "relay_upstream_error_events_total",
            {"deployment": "gpt-rt", "code": "server_error"},
        )
        == 1
    )
    assert sample(m, "relay_events_total", {"direction": "out", "type": "other"}) == 1
    assert label_for_type("session.update") == "session.update"


def test_transcription_usage(meter):
    feed(
        meter,
        "out",
        ev(
            "conversation.item.input_audio_transcription.completed",
            usage={"type": "tokens", "input_tokens": 30, "output_tokens": 7, "total_tokens": 37},
        ),
    )
    assert dict(meter.tokens) == {"transcription_input_audio": 30, "transcription_output_text": 7}
    whisper = {"type": "duration", "seconds": 2.5}
    feed(meter, "out", ev("conversation.item.input_audio_transcription.completed", usage=whisper))
    assert meter.transcription_seconds == 2.5
    td = {"team": "team-a", "deployment": "gpt-rt"}
    assert sample(meter.metrics, "relay_transcription_seconds_total", td) == 2.5


def test_cost_is_counted_per_response_and_reported():
    spent = []
    prices = PriceTable(
        input_text=4, input_cached_text=0.4, output_audio=64, transcription_per_minute=0.006
    )
    meter = SessionMeter(
        Metrics.create(CollectorRegistry()),
        "team-a",
        "gpt-rt",
        "east",
        prices=prices,
        on_cost=spent.append,
        clock=Clock(),
    )
    feed(meter, "out", ev("response.done", response={"status": "completed", "usage": USAGE}))
    # 3 uncached text tokens at $4/M, 2 cached at $0.40/M, 56 audio out at $64/M.
    first = (3 * 4 + 2 * 0.4 + 56 * 64) / 1e6
    assert spent == [pytest.approx(first)]
    whisper = {"type": "duration", "seconds": 30}
    feed(meter, "out", ev("conversation.item.input_audio_transcription.completed", usage=whisper))
    assert spent[1] == pytest.approx(0.003)
    assert meter.cost_usd == pytest.approx(first + 0.003)
    td = {"team": "team-a", "deployment": "gpt-rt"}
    assert sample(meter.metrics, "relay_cost_usd_total", td) == pytest.approx(first + 0.003)


def test_without_prices_nothing_is_costed(meter):
    feed(meter, "out", ev("response.done", response={"status": "completed", "usage": USAGE}))
    assert meter.cost_usd == 0
    assert (
        meter.metrics.registry.get_sample_value(
            "relay_cost_usd_total", {"team": "team-a", "deployment": "gpt-rt"}
        )
        is None
    )


def test_forward_delay_and_backpressure(meter):
    meter.forwarded("out", 0.002, 0.0015)
    meter.flush()
    m = meter.metrics
    assert sample(m, "relay_forward_delay_seconds_count", {"direction": "out"}) == 1
    assert sample(m, "relay_backpressure_seconds_total", {"direction": "out"}) == pytest.approx(
        0.0015
    )


def _samples(histogram: Any) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for s in next(iter(histogram.collect())).samples]


def test_batched_histogram_equals_plain_observes():
    values = [0, 0.00005, 0.0001, 0.00007, 0.3, 2.0, 0.004, 0.0049, 10.0, 0.001]
    plain = Metrics.create(CollectorRegistry())
    batched = Metrics.create(CollectorRegistry())
    buffer = BatchedHistogram(batched.relay_delay.labels("in"))
    for value in values:
        plain.relay_delay.labels("in").observe(value)
        buffer.observe(value)
    buffer.flush()
    buffer.flush()  # nothing twice
    assert _samples(batched.relay_delay) == _samples(plain.relay_delay)


def test_counted_histogram_equals_plain_observes():
    values = [0, 960, 960, 961, 4800, 160, 960, 10_000_000, 3]
    plain = Metrics.create(CollectorRegistry())
    counted = Metrics.create(CollectorRegistry())
    tally = CountedHistogram(counted.audio_chunk.labels("in"))
    for value in values:
        plain.audio_chunk.labels("in").observe(value)
        tally.values[value] = tally.values.get(value, 0) + 1
    assert tally.flush() == sum(values)  # a direction's audio bytes
    assert tally.flush() == 0  # nothing twice
    assert _samples(counted.audio_chunk) == _samples(plain.audio_chunk)


def test_a_sessions_series_are_looked_up_once_per_team_deployment_and_backend():
    metrics = Metrics.create(CollectorRegistry())
    series = metrics.series("team-a", "gpt-rt", "east")
    assert metrics.series("team-a", "gpt-rt", "east") is series
    assert metrics.series("team-a", "gpt-rt", "west") is not series
    # The very children `labels()` gives: what a session feeds is what is exported.
    assert series.sessions_active is metrics.sessions_active.labels("team-a", "gpt-rt")
    assert series.time_to_first_audio is metrics.time_to_first_audio.labels(
        "team-a", "gpt-rt", "east"
    )
    assert series.audio_seconds["out"] is metrics.audio_seconds.labels("out", "team-a", "gpt-rt")


def a_voice_turn_and_the_next(meter: SessionMeter, through_lanes: bool) -> None:
    """Two turns, appends and deltas through the meter or through its lanes where they take
    them (as the pump's callbacks do), the rest through the meter."""
    lanes = {"in": meter.lane("in", -1, 10**6), "out": meter.lane("out")} if through_lanes else {}

    def forward(direction: str, frame: bytes, at: float | None = None) -> None:
        kind = orjson.loads(frame)["type"]
        lane = lanes.get(direction)
        if lane is not None:
            taken = lane.append(frame) if direction == "in" else lane.delta(kind, frame)
            if taken >= 0:
                if at is not None:
                    meter.clock.now = at
                lane.written(time.perf_counter())
                return
        feed(meter, direction, frame, at)
        meter.forwarded(direction, 0.0, 0.0)

    for turn in range(2):
        start = 100.0 + 10 * turn
        for _ in range(50):
            forward("in", ev("input_audio_buffer.append", audio=audio(960)))
        forward("in", ev("input_audio_buffer.append", audio=audio(960)).replace(b"{", b"{ "))
        forward("out", ev("input_audio_buffer.speech_stopped", item_id="i"), at=start + 1.0)
        forward("out", ev("response.created", response={}), at=start + 1.2)
        for n in range(4):  # the first times the turn: the meter's, not a lane's
            forward("out", ev("response.output_audio.delta", delta=audio(4000)), start + 1.4 + n)
        forward("out", ev("response.done", response={"status": "completed"}), at=start + 6.0)
    meter.flush()


def test_lanes_count_what_the_meter_would_have():
    plain = SessionMeter(Metrics.create(CollectorRegistry()), "team-a", "gpt-rt", clock=Clock())
    laned = SessionMeter(Metrics.create(CollectorRegistry()), "team-a", "gpt-rt", clock=Clock())
    a_voice_turn_and_the_next(plain, through_lanes=False)
    a_voice_turn_and_the_next(laned, through_lanes=True)

    def samples(meter: SessionMeter) -> list[tuple[str, dict[str, str], float]]:
        return [
            (s.name, s.labels, s.value)
            for family in meter.metrics.registry.collect()
            for s in family.samples
            if s.name.startswith("relay_")
            and s.name != "relay_forward_delay_seconds_sum"  # measured, not fed
            and not s.name.endswith("_created")
        ]

    assert samples(laned) == samples(plain)
    td = {"team": "team-a", "deployment": "gpt-rt", "backend": "default"}
    assert sample(laned.metrics, "relay_time_to_first_audio_seconds_count", td) == 2
    assert sample(laned.metrics, "relay_time_to_first_audio_seconds_sum", td) == pytest.approx(0.8)
    assert laned.frames_total == plain.frames_total == {"in": 102, "out": 14}
