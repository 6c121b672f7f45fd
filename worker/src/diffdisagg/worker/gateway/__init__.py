"""The gateway: OpenAI-compatible HTTP API, worker registry, per-role dispatch and queue depth.

Torch-free by design (it runs in its own small image): nothing under this package imports torch, the
diffusers pipelines or the role adapters; tests/worker/test_gateway_torchfree.py proves it.
"""
