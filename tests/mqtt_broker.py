"""A real mosquitto broker on a free loopback port, and a subscriber that keeps what it receives (for tests)."""
from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

WAIT = 10.0  # seconds any start, stop or delivery may take before a test gives up


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    """``mosquitto`` bound to 127.0.0.1 with persistence, so a durable subscriber's queue survives a restart."""

    def __init__(self, folder: Path):
        self.binary = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")
        if self.binary is None:
            pytest.skip("the mosquitto binary is not installed (apt-get install mosquitto; .ci/run installs it)")
        self.port = free_port()
        self.folder = folder
        self.config = folder / "mosquitto.conf"
        self.config.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
                               f"persistence_location {folder}/\nautosave_interval 0\n")
        self.process = None

    def start(self) -> "Broker":
        self.process = subprocess.Popen([self.binary, "-c", str(self.config)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"mosquitto did not listen on port {self.port} within {WAIT} s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(WAIT)
        self.process = None

    def url(self, topic: str) -> str:
        return f"mqtt://127.0.0.1:{self.port}/{topic}"


class Subscriber:
    """A durable QoS 1 subscription (clean_session off): what the broker queued while it was away arrives later."""

    def __init__(self, broker: Broker, topic: str):
        import paho.mqtt.client as mqtt

        self.messages: list[bytes] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-sub-{broker.port}",
                                  clean_session=False)
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_message = self._keep
        self.subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.connect("127.0.0.1", broker.port, keepalive=5)
        self.client.loop_start()
        if not self.subscribed.wait(WAIT):
            self.close()
            raise RuntimeError("the subscription was not acknowledged")

    def _keep(self, client, userdata, message) -> None:
        with self.lock:
            self.messages.append(message.payload)

    def received(self) -> list[bytes]:
        with self.lock:
            return list(self.messages)

    def wait_for(self, count: int, timeout: float = WAIT) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while len(self.received()) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.received()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
