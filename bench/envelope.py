"""CPU cost per event of envelope encoding and validated decoding, beside bare orjson.

envelope_encode_events_per_s: ``envelope.encode`` of 100-event envelopes (model_dump_json).
envelope_decode_events_per_s: ``Topic.USAGE.codec.decode`` (pydantic, the events.usage union).
orjson_parse_events_per_s: parsing the same bytes with orjson alone (the floor of any decode).
"""

from __future__ import annotations

import orjson

from bench.broker import ENVELOPE, _events
from bench.harness import median_rate, merge, report, timed
from churnguard.common import envelope
from churnguard.common.topics import Topic

EVENTS = 50_000
REPEATS = 5


def run() -> dict[str, float]:
    events = _events(EVENTS)
    groups = [events[i : i + ENVELOPE] for i in range(0, EVENTS, ENVELOPE)]
    blobs = [envelope.encode(g) for g in groups]
    codec = Topic.USAGE.codec

    def encode() -> float:
        return EVENTS / timed(lambda: [envelope.encode(g) for g in groups])

    def decode() -> float:
        return EVENTS / timed(lambda: [codec.decode(b) for b in blobs])

    def parse() -> float:
        return EVENTS / timed(lambda: [orjson.loads(b) for b in blobs])

    enc, enc_runs = median_rate(encode, REPEATS)
    dec, dec_runs = median_rate(decode, REPEATS)
    raw, raw_runs = median_rate(parse, REPEATS)

    def fmt(runs: list[float]) -> str:
        return ", ".join(f"{r:,.0f}" for r in runs)

    report(
        "envelope (one core, 100-event envelopes)",
        [
            ("envelope_encode_events_per_s", enc, fmt(enc_runs)),
            ("envelope_decode_events_per_s", dec, fmt(dec_runs)),
            ("orjson_parse_events_per_s", raw, fmt(raw_runs)),
        ],
        [("validated decode ÷ bare orjson parse", dec / raw)],
    )
    return {
        "envelope_encode_events_per_s": enc,
        "envelope_decode_events_per_s": dec,
        "orjson_parse_events_per_s": raw,
    }


if __name__ == "__main__":
    merge(run())
