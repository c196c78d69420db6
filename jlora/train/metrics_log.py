"""A run's metrics on disk: metrics.jsonl (one JSON object per line, appended) and TensorBoard events.

Both are written and flushed on the calling thread, row by row. tensorboardX's SummaryWriter
writes from a background thread. On a full disk that thread dies with a traceback of its own,
and the queue it leaves behind blocks the training loop once it fills. So we use tensorboardX's
synchronous EventsWriter: a write error reaches the loop as an OSError, and the run stops with one line.
Only process 0 writes. What the rows hold is jlora.train.loop's business.
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any


class MetricsLog:
    """metrics.jsonl and TensorBoard scalars under `out_dir`; a no-op when not `enabled`."""

    def __init__(self, out_dir: pathlib.Path, enabled: bool):
        self.enabled = enabled
        if enabled:
            from tensorboardX.event_file_writer import EventsWriter

            (out_dir / "tensorboard").mkdir(parents=True, exist_ok=True)
            self.file = open(out_dir / "metrics.jsonl", "a", encoding="utf-8")
            self.tb = EventsWriter(str(out_dir / "tensorboard" / "events"))

    def write(self, row: dict[str, Any]) -> None:
        """Append one row ({"step": n, name: value, ...}); numbers also go to TensorBoard."""
        if not self.enabled:
            return
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                self.tb.write_event(Event(wall_time=time.time(), step=int(row["step"]), summary=scalar(k, v)))
        self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.tb.close()
