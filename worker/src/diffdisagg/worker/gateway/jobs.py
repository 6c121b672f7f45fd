"""Video jobs (`POST /v1/videos` returns at once; the client polls and downloads).

Jobs live in this gateway's memory, which is why the operator keeps the gateway at one replica until job
state is shared. Finished jobs are evicted oldest-first beyond `max_jobs`.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from diffdisagg.worker.gateway.dispatch import Dispatcher, Result, Tracked
from diffdisagg.worker.gateway.errors import APIError


@dataclass
class VideoJob:
    id: str
    model: str
    prompt: str
    size: str
    seconds: str
    created_at: int
    tracked: Tracked
    status: str = "queued"
    completed_at: int | None = None
    result: Result | None = None
    error: APIError | None = None
    task: asyncio.Task[Any] | None = field(default=None, repr=False)

    def view(self, dispatcher: Dispatcher) -> dict[str, Any]:
        """The object the openai client parses as `openai.types.Video`."""
        status = self.status
        if status == "queued" and self.tracked.role != "prefill":
            status = "in_progress"
        out: dict[str, Any] = {
            "id": self.id,
            "object": "video",
            "created_at": self.created_at,
            "completed_at": self.completed_at,
            "expires_at": None,
            "model": self.model,
            "progress": 100 if status == "completed" else dispatcher.progress(self.tracked),
            "prompt": self.prompt,
            "remixed_from_video_id": None,
            "seconds": self.seconds,
            "size": self.size,
            "status": status,
            "error": None,
        }
        if self.error is not None:
            out["error"] = {
                "code": self.error.code or "error",
                "message": self.error.message,
                "param": self.error.param,
                "type": self.error.type,
            }
        # Extension (docs/playground.md): ignored by the openai client; timings once the job is done.
        ext: dict[str, Any] = {"request_id": self.tracked.id, "seed": self.tracked.params.get("seed")}
        if self.result is not None:
            ext["timings_ms"] = self.result.timings_ms
            ext["timings"] = self.result.timings
        out["diffdisagg"] = ext
        return out


class JobStore:
    def __init__(self, dispatcher: Dispatcher, max_jobs: int) -> None:
        self.d = dispatcher
        self.max_jobs = max_jobs
        self.jobs: OrderedDict[str, VideoJob] = OrderedDict()

    def create(self, tracked: Tracked, model: str, prompt: str, size: str, seconds: str) -> VideoJob:
        job = VideoJob(
            id=f"video_{uuid.uuid4().hex}",
            model=model,
            prompt=prompt,
            size=size,
            seconds=seconds,
            created_at=int(time.time()),
            tracked=tracked,
        )
        self.jobs[job.id] = job
        job.task = asyncio.get_running_loop().create_task(self._watch(job))
        self._evict()
        return job

    async def _watch(self, job: VideoJob) -> None:
        try:
            job.result = await job.tracked.future
            job.status = "completed"
        except APIError as err:
            job.error, job.status = err, "failed"
        finally:
            job.completed_at = int(time.time())
            self.d.forget(job.tracked.id)

    def get(self, job_id: str) -> VideoJob:
        job = self.jobs.get(job_id)
        if job is None:
            raise APIError(404, f"no video job {job_id!r}", param="video_id", code="not_found")
        return job

    def _evict(self) -> None:
        while len(self.jobs) > self.max_jobs:
            oldest = next((k for k, j in self.jobs.items() if j.status in ("completed", "failed")), None)
            if oldest is None:
                break
            del self.jobs[oldest]
