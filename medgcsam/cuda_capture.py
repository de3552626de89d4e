"""Capturing work into a CUDA graph so that a capture that fails leaves CUDA as usable as before.

Used by the graphed training step and evaluation forward (``engine.graphed``) and the graphed Hessian-vector
product (``sharpness.operator``); a module of its own because those layers do not import each other.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def capture_into(graph: torch.cuda.CUDAGraph, device: torch.device, pool: tuple | None = None,
                 stream: torch.cuda.Stream | None = None) -> Iterator[tuple]:
    """``torch.cuda.graph`` on ``stream`` (default: torch's capture stream; thread-local error mode; yields the
    memory pool) that, when the capture raises, first undoes what torch 2.4-2.11 leave behind, so CUDA stays
    usable for the eager fallback.

    ``torch.cuda.graph.__exit__`` calls ``capture_end``; when the capture was invalidated (a host sync inside
    it), ``cudaStreamEndCapture`` fails and ``capture_end`` raises before (1) the default CUDA generator's
    ``capture_epilogue``, so it stays in capture mode and every later random op outside a capture raises
    "Offset increment outside graph capture encountered unexpectedly"; (2) the allocator's
    ``endAllocateToPool``, so it keeps checking allocations against a capture that is gone; (3) the stream
    context's exit, so the current stream stays the capture stream. The generator gets back a clone of its state
    taken before the capture (a capture advances only the intra-graph offset: the same random position); graphs
    captured earlier keep the old state object, which only their replays use."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    pool = pool if pool is not None else torch.cuda.graph_pool_handle()
    # thread_local: a loader's pin-memory thread may call CUDA while this thread captures
    capture = torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local")
    current = torch.cuda.current_stream(device)
    generator = torch.cuda.default_generators[index]
    rng = generator.clone_state()
    torch.cuda.synchronize(device)
    try:
        with capture:
            yield pool
    except BaseException:
        with torch.cuda.stream(capture.capture_stream):
            if torch.cuda.is_current_stream_capturing():  # raised before __exit__ could end it
                with contextlib.suppress(Exception):
                    graph.capture_end()
        torch.cuda.set_stream(current)
        with contextlib.suppress(Exception):  # raises when capture_end got as far as ending it
            torch._C._cuda_endAllocateToPool(index, pool)
        generator.graphsafe_set_state(rng)
        with contextlib.suppress(Exception):
            torch.cuda.synchronize(device)
        raise
