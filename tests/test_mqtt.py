import json
import threading
import time

import pytest
from mqtt_broker import WAIT, Broker, Subscriber

from dinopatch.mqtt import CURSOR, Outbox, parse_url


@pytest.fixture
def broker(tmp_path):
    b = Broker(tmp_path).start()
    yield b
    b.stop()


def test_parse_url():
    assert parse_url("mqtt://127.0.0.1:1884/line/3") == ("127.0.0.1", 1884, "line/3")
    assert parse_url("mqtt://plc/verdicts") == ("plc", 1883, "verdicts")
    for bad in ("http://h/t", "mqtt://h:1883/", "mqtt://h/a/#", "mqtt://h:99999/t", "mqtt:///t"):
        with pytest.raises(ValueError, match="mqtt"):
            parse_url(bad)


def _append(log, records):
    with open(log, "a", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
            f.flush()


def test_broker_away_mid_run_loses_nothing_and_keeps_order(broker, tmp_path):
    log = tmp_path / "predictions.jsonl"
    records = [{"id": f"{i:04d}", "score": float(i)} for i in range(120)]
    sub = Subscriber(broker, "line/verdicts")
    box = Outbox(broker.url("line/verdicts"), log).start()
    try:
        writer = threading.Thread(target=lambda: [(_append(log, [r]), time.sleep(0.01)) for r in records])
        writer.start()
        assert len(sub.wait_for(20)) >= 20
        broker.stop()  # the broker goes away while records keep coming
        time.sleep(3.0)
        assert box.pending() > 0, "records written while the broker was away wait in the outbox"
        broker.start()
        writer.join(WAIT)
        left = box.close(timeout=3 * WAIT)
        got = [json.loads(m)["id"] for m in sub.wait_for(len(records), 3 * WAIT)]
    finally:
        sub.close()
    assert left == 0
    assert set(got) == {r["id"] for r in records}, "no record lost"
    first = list(dict.fromkeys(got))  # at least once: a re-sent duplicate may follow, never come first
    assert first == [r["id"] for r in records], "in order"
    assert int((tmp_path / CURSOR).read_text()) == log.stat().st_size


def test_unreachable_broker_keeps_records_and_a_later_run_delivers(tmp_path):
    broker = Broker(tmp_path)  # configured, not started
    log = tmp_path / "predictions.jsonl"
    _append(log, [{"id": str(i)} for i in range(5)])
    box = Outbox(broker.url("t"), log).start()
    assert box.close(timeout=1.0) == 5
    assert not (tmp_path / CURSOR).exists() or int((tmp_path / CURSOR).read_text()) == 0
    broker.start()
    try:
        sub = Subscriber(broker, "t")
        try:
            _append(log, [{"id": "5"}])
            assert Outbox(broker.url("t"), log).start().close(timeout=WAIT) == 0
            got = [json.loads(m)["id"] for m in sub.wait_for(6)]
        finally:
            sub.close()
    finally:
        broker.stop()
    assert got[:6] == [str(i) for i in range(6)]


def test_a_torn_last_line_waits_and_a_bad_cursor_is_refused(broker, tmp_path):
    log = tmp_path / "predictions.jsonl"
    log.write_bytes(b'{"id": "a"}\n{"id": "b", "sc')  # a run killed while writing its second record
    box = Outbox(broker.url("t"), log).start()
    assert box.close(timeout=WAIT) == 0 and box.delivered == 1
    (tmp_path / CURSOR).write_text("twelve")
    with pytest.raises(ValueError, match="byte offset"):
        Outbox(broker.url("t"), log)


def test_predict_publishes_every_record_with_its_id(broker, tmp_path, capsys):
    import cv2
    from conftest import FAST, screws

    from dinopatch import DinoPatch
    from dinopatch.cli import EXIT_SOME_FAILED, main

    model = DinoPatch(**FAST).fit(screws("good", 6, seed=1)).save(tmp_path / "model.npz")
    parts = tmp_path / "parts"
    parts.mkdir()
    for i, im in enumerate(screws("good", 3, seed=2)):
        cv2.imwrite(str(parts / f"{i}.png"), im)
    (parts / "broken.png").write_bytes(b"\x89PNG\r\n")
    sub = Subscriber(broker, "plant/line1")
    try:
        code = main(["predict", str(parts), "-m", str(model), "-o", str(tmp_path / "out"), "-q", "--no-overlays",
                     "--mqtt", broker.url("plant/line1")])
        got = [json.loads(m) for m in sub.wait_for(4)]
    finally:
        sub.close()
    said = capsys.readouterr().out
    assert code == EXIT_SOME_FAILED and "mqtt: 4 records delivered to plant/line1" in said
    written = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert got == written and len({r["id"] for r in got}) == 4
    assert sum(r["error"] is not None for r in got) == 1 and all("drift" in r for r in got)
