"""PostgreSQL LISTEN/NOTIFY: admin changes wake every node's inventory refresh.

`notify_change` is called inside the admin transaction (NOTIFY is delivered
on commit). `Listener` is a daemon thread holding one psycopg2 connection in
LISTEN mode; on a notification it calls ``wake`` (thread-safe). It reconnects
with a bounded pause when the database goes away, and stops with the node.
"""

from __future__ import annotations

import logging
import select
import threading
from collections.abc import Callable

from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

CHANNEL = "pvsfarm_inventory"
RECONNECT_PAUSE_S = 2.0
POLL_S = 1.0

log = logging.getLogger("pvsfarm.notify")


def notify_change(session: Session) -> None:
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text(f"NOTIFY {CHANNEL}"))


class Listener(threading.Thread):
    def __init__(self, engine: Engine, wake: Callable[[], None]) -> None:
        super().__init__(name="pvsfarm-listen", daemon=True)
        self.engine, self.wake = engine, wake
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                self._listen()
            except Exception as exc:  # noqa: BLE001 - any driver error: reconnect after a pause
                log.debug("listen connection lost: %s", exc)
            self.stop_event.wait(RECONNECT_PAUSE_S)

    def _listen(self) -> None:
        raw = self.engine.raw_connection()
        try:
            dbapi = raw.driver_connection
            dbapi.autocommit = True  # type: ignore[union-attr]
            dbapi.cursor().execute(f"LISTEN {CHANNEL}")  # type: ignore[union-attr]
            while not self.stop_event.is_set():
                ready, _, _ = select.select([dbapi], [], [], POLL_S)
                if ready:
                    dbapi.poll()  # type: ignore[union-attr]
                    if dbapi.notifies:  # type: ignore[union-attr]
                        dbapi.notifies.clear()  # type: ignore[union-attr]
                        self.wake()
        finally:
            raw.invalidate()

    def stop(self) -> None:
        self.stop_event.set()
