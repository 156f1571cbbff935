"""Verdicts to the plant: every record of a run published to an MQTT topic, none lost while the broker is away.

The outbox is the run's own ``predictions.jsonl`` and a cursor file beside it
(:data:`CURSOR`, the byte offset of the first record not yet acknowledged).
A sender thread publishes the records after the cursor one by one with QoS 1
and moves the cursor only when the broker has acknowledged (PUBACK), so
records written while the broker is unreachable wait on disk and go out in
order when it returns, and a run killed and started again resumes from the
cursor.  Delivery is at least once: a record whose acknowledgement was lost is
published again; each carries a unique ``id`` (:mod:`dinopatch.stamp`) so a
consumer drops what it already has.  Needs ``paho-mqtt`` (the ``line`` extra).
"""
from __future__ import annotations

import os
import threading
import time
import urllib.parse
import uuid
from pathlib import Path

# The cursor file, in the output folder beside the log it follows.
CURSOR = "mqtt.cursor"
DEFAULT_PORT = 1883
# How long one publish waits for its acknowledgement before it is sent again.
ACK_TIMEOUT = 5.0
_POLL = 0.02  # how often the sender looks for new records or a connection


def parse_url(url: str) -> tuple[str, int, str]:
    """``mqtt://HOST[:PORT]/TOPIC`` -> ``(host, port, topic)``; ValueError naming what is wrong."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "mqtt":
        raise ValueError(f"--mqtt {url!r}: give mqtt://HOST[:PORT]/TOPIC (only plain mqtt:// is supported)")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise ValueError(f"--mqtt {url!r}: the port is not a number in [1, 65535]") from None
    topic = urllib.parse.unquote(parts.path.lstrip("/"))
    if not parts.hostname or not topic or any(c in topic for c in "+#\0") or "#" in url or parts.query:
        raise ValueError(f"--mqtt {url!r}: a host and a topic without wildcards are needed "
                         "(mqtt://HOST[:PORT]/TOPIC)")
    return parts.hostname, port, topic


class Outbox:
    """Publishes the lines of a JSON-lines log, in order, QoS 1, from a cursor kept in a file.

    Args:
        url: ``mqtt://HOST[:PORT]/TOPIC``.
        log: the log file (``predictions.jsonl``); lines are appended by others while the outbox runs.
        cursor: the cursor file (default: :data:`CURSOR` beside the log).

    Only complete lines (ending in a newline) are sent.  :meth:`close` waits for what was written so far.
    """

    def __init__(self, url: str, log: str | os.PathLike, cursor: str | os.PathLike | None = None):
        import paho.mqtt.client as mqtt  # the line extra; imported only where --mqtt is given

        self.host, self.port, self.topic = parse_url(url)
        self.log = Path(log)
        self.cursor = self.log.with_name(CURSOR) if cursor is None else Path(cursor)
        self.offset = self._read_cursor()
        self.delivered = 0
        self._connected = threading.Event()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"dinopatch-{uuid.uuid4().hex[:12]}")
        self._client.reconnect_delay_set(min_delay=0.1, max_delay=1.0)
        self._client.on_connect = lambda c, u, f, rc, p: rc == 0 and self._connected.set()
        self._client.on_disconnect = lambda c, u, f, rc, p: self._connected.clear()
        self._success = mqtt.MQTT_ERR_SUCCESS
        self._thread = threading.Thread(target=self._send, name="dinopatch-mqtt", daemon=True)

    def start(self) -> "Outbox":
        """Connect (in the background: an unreachable broker is retried) and start sending."""
        self._client.connect_async(self.host, self.port, keepalive=10)
        self._client.loop_start()
        self._thread.start()
        return self

    def notify(self) -> None:
        """Say that the log grew (the sender also looks by itself every few milliseconds)."""
        self._wake.set()

    def pending(self) -> int:
        """Complete records in the log not yet acknowledged by the broker."""
        try:
            with open(self.log, "rb") as f:
                f.seek(self.offset)
                return f.read().count(b"\n")
        except FileNotFoundError:
            return 0

    def close(self, timeout: float) -> int:
        """Wait up to ``timeout`` s for every complete record written so far, then stop; the records left."""
        deadline = time.monotonic() + timeout
        while self.pending() and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(_POLL)
        self._stop.set()
        self._thread.join(ACK_TIMEOUT + 1.0)
        self._client.disconnect()
        self._client.loop_stop()
        return self.pending()

    def _read_cursor(self) -> int:
        try:
            offset = int(self.cursor.read_text().strip() or 0)
        except FileNotFoundError:
            return 0
        except ValueError:
            raise ValueError(f"{self.cursor} is not a byte offset: remove it to publish the log from the start") \
                from None
        size = self.log.stat().st_size if self.log.exists() else 0
        # A log shorter than the cursor is another run's log: send it from its start.
        return offset if 0 <= offset <= size else 0

    def _write_cursor(self) -> None:
        tmp = self.cursor.with_name(self.cursor.name + ".tmp")
        tmp.write_text(f"{self.offset}\n")
        os.replace(tmp, self.cursor)

    def _next_line(self) -> bytes | None:
        try:
            with open(self.log, "rb") as f:
                f.seek(self.offset)
                line = f.readline()
        except FileNotFoundError:
            return None
        return line if line.endswith(b"\n") else None

    def _send(self) -> None:
        while not self._stop.is_set():
            line = self._next_line() if self._connected.is_set() else None
            if line is None:
                self._wake.wait(_POLL)
                self._wake.clear()
                continue
            if self._publish(line.rstrip(b"\r\n")):
                self.offset += len(line)
                self.delivered += 1
                self._write_cursor()

    def _publish(self, payload: bytes) -> bool:
        """One record, until acknowledged; False when the connection went away first (sent again later)."""
        info = self._client.publish(self.topic, payload, qos=1)
        if info.rc != self._success:
            time.sleep(_POLL)
            return False
        deadline = time.monotonic() + ACK_TIMEOUT
        while not info.is_published():
            if not self._connected.is_set() or time.monotonic() > deadline or self._stop.is_set():
                return False
            time.sleep(_POLL / 10)
        return True
