"""Trigger that waits, on the triggerer, for one trial's result of one stage in run storage."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

from airflow.triggers.base import BaseTrigger, TriggerEvent

from rubberband_airflow.execution.storage import RunStorage


class TrialResultTrigger(BaseTrigger):
    """Polls ``trials/<trial>/stage-<stage>.json`` until it exists, then fires with its content."""

    def __init__(self, run_uri: str, trial: str, stage: int, poll_interval: float = 5.0) -> None:
        super().__init__()
        self.run_uri = run_uri
        self.trial = trial
        self.stage = stage
        self.poll_interval = poll_interval

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{type(self).__module__}.{type(self).__qualname__}",
                {"run_uri": self.run_uri, "trial": self.trial, "stage": self.stage,
                 "poll_interval": self.poll_interval})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        storage = RunStorage(self.run_uri)
        while True:
            # fsspec calls block: keep them off the triggerer's event loop
            result = await asyncio.to_thread(storage.read_result, self.trial, self.stage)
            if result is not None:
                yield TriggerEvent({"trial": self.trial, "stage": self.stage, "result": result})
                return
            await asyncio.sleep(self.poll_interval)
