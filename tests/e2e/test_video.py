"""Video jobs (Wan, tiny) through the official openai client — create, retrieve, download_content — and the
CLI's progress line."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

from openai import OpenAI

from diffdisagg.worker.launcher import LocalDeployment

S = sys.modules["diffdisagg_e2e_support"]  # loaded by conftest.py


def _is_mp4(data: bytes) -> bool:
    return len(data) > 32 and data[4:8] == b"ftyp"


def test_openai_client_video_job(wan: LocalDeployment) -> None:
    client = OpenAI(base_url=wan.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the client marks the Sora API deprecated
        job = client.videos.create(
            prompt="waves on a beach",
            size="64x64",
            extra_body={"num_frames": 5, "seed": 3, "num_inference_steps": 2},
        )
        assert job.object == "video" and job.status in ("queued", "in_progress", "completed")
        assert job.size == "64x64"
        deadline = time.monotonic() + 60
        while job.status in ("queued", "in_progress"):
            assert time.monotonic() < deadline, job
            time.sleep(0.2)
            job = client.videos.retrieve(job.id)
        assert job.status == "completed" and job.progress == 100, job
        content = client.videos.download_content(job.id)
        data = content.read()
    assert _is_mp4(data), data[:16]
    status, body = S.http_json("GET", wan.url + "/v1/videos/video_missing")
    assert status == 404 and body["error"]["code"] == "not_found"


def test_cli_video_progress(wan: LocalDeployment, tmp_path: Path) -> None:
    out = tmp_path / "clip.mp4"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "diffdisagg.worker",
            "generate",
            "a windmill",
            "-o",
            str(out),
            "--url",
            wan.url,
            "--num-frames",
            "5",
            "--steps",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ),
    )
    assert proc.returncode == 0, proc.stderr
    assert "100%" in proc.stderr and "completed" in proc.stderr
    assert _is_mp4(out.read_bytes())
