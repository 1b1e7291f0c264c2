"""The disk spool on its own: order, segment rolling, cursor, torn/corrupt records, the cap, fsync policy.

Pure file-system tests (no Kafka): the spool is plain files, so every part here is the real one.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cohere_gateway.addons.spool import HEADER, Position, Spool, encode_record


def read_all(spool: Spool, pos: Position | None = None) -> tuple[list[tuple[bytes, bytes]], Position]:
    pos = pos or spool.start
    out: list[tuple[bytes, bytes]] = []
    while True:
        records, pos = spool.read(pos, 7)
        out += [(r.key, r.value) for r in records]
        if not records:
            return out, pos


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.seg"))


def fill(spool: Spool, n: int, size: int = 100) -> list[tuple[bytes, bytes]]:
    items = [(f"acct/gw{i % 3}".encode(), f"{i:06d}".encode() * (size // 6)) for i in range(n)]
    for key, value in items:
        assert spool.append(key, value)
    return items


def test_records_come_back_in_order_across_segments_and_commit_frees_them(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=10_000_000, segment_bytes=1000)
    items = fill(spool, 50)
    assert len(segments(tmp_path)) > 3
    got, end = read_all(spool)
    assert got == items
    assert spool.is_drained(end)
    spool.commit(end)
    # Only the segment holding the end position may remain until the reader moves past it.
    assert len(segments(tmp_path)) <= 1
    assert spool.reset_if_drained(end)
    assert segments(tmp_path) == [] and spool.size_bytes == 0


def test_reader_sees_records_appended_after_it_caught_up(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=10_000_000, fsync="interval", fsync_interval_ms=60_000)
    fill(spool, 3)
    got, pos = read_all(spool)
    assert len(got) == 3
    spool.append(b"k", b"late")
    records, pos = spool.read(pos, 10)
    assert [r.value for r in records] == [b"late"]
    assert not spool.reset_if_drained(Position(pos.segment, 0))
    assert spool.reset_if_drained(pos)


def test_reopen_resumes_from_the_committed_cursor(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=10_000_000, segment_bytes=2000)
    items = fill(spool, 40)
    _, pos = spool.read(spool.start, 25)
    spool.commit(pos)
    spool.close()

    reopened = Spool(tmp_path, max_bytes=10_000_000, segment_bytes=2000)
    assert reopened.start == pos
    got, _ = read_all(reopened)
    assert got == items[25:]
    # A new process appends to a new segment, after everything already there.
    reopened.append(b"k", b"new")
    got, _ = read_all(reopened)
    assert got == [*items[25:], (b"k", b"new")]


def test_torn_tail_is_skipped_counted_and_later_segments_still_read(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=10_000_000)
    items = fill(spool, 5)
    spool.close()
    seg = segments(tmp_path)[-1]
    # Crash mid-write: the last record is cut short.
    os.truncate(seg, seg.stat().st_size - 30)

    reopened = Spool(tmp_path, max_bytes=10_000_000)
    reopened.append(b"k", b"after-crash")
    got, _ = read_all(reopened)
    assert got == [*items[:4], (b"k", b"after-crash")]
    assert reopened.corrupt_records == 1


@pytest.mark.parametrize("where", ["magic", "length", "crc", "payload"])
def test_a_corrupt_record_is_skipped_alone(tmp_path: Path, where: str) -> None:
    spool = Spool(tmp_path, max_bytes=10_000_000)
    items = fill(spool, 5)
    spool.close()
    record_len = len(encode_record(*items[0]))
    at = 2 * record_len + {"magic": 0, "length": 5, "crc": 9, "payload": HEADER.size + 20}[where]
    seg = segments(tmp_path)[0]
    data = bytearray(seg.read_bytes())
    data[at] ^= 0xFF
    seg.write_bytes(bytes(data))

    reopened = Spool(tmp_path, max_bytes=10_000_000)
    got, _ = read_all(reopened)
    assert got == items[:2] + items[3:]
    assert reopened.corrupt_records == 1


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    values=st.lists(st.binary(min_size=0, max_size=300), min_size=2, max_size=12),
    victim=st.integers(min_value=0),
    byte=st.integers(min_value=0),
)
def test_any_single_byte_flip_loses_only_the_record_it_hits(
    tmp_path_factory: pytest.TempPathFactory, values: list[bytes], victim: int, byte: int
) -> None:
    directory = tmp_path_factory.mktemp("spool")
    spool = Spool(directory, max_bytes=10_000_000)
    items = [(f"k{i}".encode(), v) for i, v in enumerate(values)]
    for key, value in items:
        spool.append(key, value)
    spool.close()
    victim %= len(items)
    lengths = [len(encode_record(*item)) for item in items]
    at = sum(lengths[:victim]) + byte % lengths[victim]
    seg = segments(directory)[0]
    data = bytearray(seg.read_bytes())
    data[at] ^= 0x5A
    seg.write_bytes(bytes(data))

    reopened = Spool(directory, max_bytes=10_000_000)
    got, _ = read_all(reopened)
    assert got == items[:victim] + items[victim + 1 :]
    assert reopened.corrupt_records == 1


def test_cap_refuses_appends_and_replay_frees_room(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=5000, segment_bytes=1000)
    accepted = sum(spool.append(b"k", b"x" * 100) for _ in range(100))
    assert 0 < accepted < 100
    assert spool.size_bytes <= 5000
    assert not spool.append(b"k", b"x" * 100)
    _, end = read_all(spool)
    spool.commit(end)
    assert spool.append(b"k", b"x" * 100)


def test_fsync_always_puts_each_record_in_the_file_at_once(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=10_000_000, fsync="always")
    spool.append(b"k", b"v")
    assert segments(tmp_path)[0].stat().st_size == len(encode_record(b"k", b"v"))


def test_fsync_interval_buffers_until_the_interval_passes(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=10_000_000, fsync="interval", fsync_interval_ms=3_600_000)
    spool.append(b"k", b"v")
    spool.append(b"k", b"w")
    seg = segments(tmp_path)[0]
    assert seg.stat().st_size == 0  # still in the process's buffer: what a kill -9 now would lose
    spool.flush()
    assert seg.stat().st_size == 2 * len(encode_record(b"k", b"v"))


def test_bad_settings_are_refused_with_a_clear_message(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fsync must be one of always, interval, never"):
        Spool(tmp_path, max_bytes=1000, fsync="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max bytes must be positive"):
        Spool(tmp_path, max_bytes=0)


def test_unreadable_cursor_falls_back_to_the_oldest_segment(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=10_000_000)
    items = fill(spool, 3)
    spool.close()
    (tmp_path / "cursor").write_text("{not json")
    reopened = Spool(tmp_path, max_bytes=10_000_000)
    got, _ = read_all(reopened)
    assert got == items
