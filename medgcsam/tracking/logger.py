"""Metric logging that survives a tracking-server outage.

Metrics are buffered and sent in batches; a failed send keeps them in the buffer and training
goes on. While the server is down each attempt fails fast (no retries inside MLflow's client,
whose default backoff would stall training for minutes). At the end of a run the buffer is sent
with retries, and whatever still cannot be sent is written to a JSON file next to the checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from medgcsam.files import replace_atomically

log = logging.getLogger(__name__)

MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch call


@contextlib.contextmanager
def fail_fast_http(timeout_s: float = 10.0) -> Iterator[None]:
    """One attempt per MLflow REST call, bounded by ``timeout_s``, for the duration of the block."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(max(1, int(timeout_s)))
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class ResilientMetricLogger:
    """Buffers ``(key, value, step)`` metrics for one run and flushes them, tolerating outages."""

    def __init__(self, client: MlflowClient, run_id: str, *, spill_path: str | Path | None = None,
                 timeout_s: float = 10.0) -> None:
        self.client, self.run_id = client, run_id
        self.spill_path = Path(spill_path) if spill_path is not None else None
        self.timeout_s = timeout_s
        self._buffer: list[Metric] = []
        self._failing = False

    @property
    def pending(self) -> int:
        return len(self._buffer)

    def buffered(self, key: str) -> list[Metric]:
        """Queued, not yet sent values of ``key``."""
        return [m for m in self._buffer if m.key == key]

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Queue metrics (host floats); nothing is sent until :meth:`flush`."""
        now = int(time.time() * 1000)
        self._buffer.extend(Metric(k, float(v), now, int(step)) for k, v in metrics.items())

    def flush(self) -> bool:
        """Send what is buffered in one attempt; on failure keep it and return False (training continues)."""
        try:
            with fail_fast_http(self.timeout_s):
                while self._buffer:
                    chunk = self._buffer[:MAX_BATCH]
                    self.client.log_batch(self.run_id, metrics=chunk)
                    del self._buffer[: len(chunk)]
        except Exception as exc:  # any transport or server error: keep the metrics for the next attempt
            if not self._failing:
                log.warning("MLflow unreachable, %d metrics kept for later (%s); training continues",
                            len(self._buffer), exc)
            self._failing = True
            return False
        if self._failing:
            log.warning("MLflow reachable again; buffered metrics sent")
        self._failing = False
        return True

    def close(self, retry_for_s: float = 60.0) -> bool:
        """Flush with retries for up to ``retry_for_s``; spill the rest to JSON so nothing is lost."""
        deadline = time.monotonic() + retry_for_s
        delay = 1.0
        while not self.flush():
            if time.monotonic() + delay > deadline:
                self._spill()
                return False
            time.sleep(delay)
            delay = min(delay * 2, 10.0)
        return True

    def take_spilled(self) -> int:
        """Queue again what an earlier process of this run spilled (sent with the next flush); returns how many."""
        if self.spill_path is None or not self.spill_path.is_file():
            return 0
        saved = json.loads(self.spill_path.read_text(encoding="utf-8"))
        if saved.get("run_id") != self.run_id:
            return 0
        rows = saved.get("metrics", [])
        self._buffer.extend(Metric(r["key"], float(r["value"]), int(r["timestamp"]), int(r["step"])) for r in rows)
        self.spill_path.unlink()  # in the buffer now; spilled again if the store is still away at close
        return len(rows)

    def _spill(self) -> None:
        if self.spill_path is None:
            log.error("MLflow unreachable at the end of the run: %d metrics lost", len(self._buffer))
            return
        self.spill_path.parent.mkdir(parents=True, exist_ok=True)
        rows = [{"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step} for m in self._buffer]
        # atomic: a half-written file would lose every metric in it when it is read back on resume
        replace_atomically(self.spill_path, lambda fh: json.dump({"run_id": self.run_id, "metrics": rows}, fh))
        log.error("MLflow unreachable at the end of the run: %d metrics written to %s; send them later with "
                  "MlflowClient().log_batch(run_id, metrics)", len(rows), self.spill_path)
