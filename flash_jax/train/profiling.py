"""Profiling a run: a `jax.profiler` trace of a few steps, and a profiler server.

`train.profile_steps` > 0 traces steps profile_start + 1 .. profile_start + profile_steps (those a
run reaches: a run resumed past them traces none) into the run's TensorBoard folder, each step
annotated (`jax.profiler.StepTraceAnnotation`), so TensorBoard's profile tab shows per-step
times: `tensorboard --logdir <workdir>/tensorboard` (with the `tensorboard-plugin-profile`
package), or open `plugins/profile/<time>/<host>.xplane.pb` in Perfetto / XProf. The trace stops
after the last traced step has finished on the device.

`train.profile_port` > 0 starts `jax.profiler.start_server(port)` for on-demand capture (the
profile tab's "Capture profile", pointed at host:port) for the run's lifetime.
"""

from __future__ import annotations

import jax
from absl import logging


class Profiler:
    def __init__(self, train_config, log_dir: str):
        self.first = train_config.profile_start + 1  # the first traced step
        self.last = train_config.profile_start + train_config.profile_steps
        self.log_dir = log_dir
        self.tracing = False
        self.server = False
        if train_config.profile_port:
            jax.profiler.start_server(train_config.profile_port)
            self.server = True
            logging.info("profiler server listening on port %d", train_config.profile_port)

    def step(self, step: int):
        """The annotation around the dispatch of `step` (starting the trace at the first)."""
        if not self.tracing and self.first <= step <= self.last:
            jax.profiler.start_trace(self.log_dir)
            self.tracing = True
            logging.info("profiling steps %d to %d into %s", step, self.last, self.log_dir)
        return jax.profiler.StepTraceAnnotation("train", step_num=step)

    def after(self, step: int, state) -> None:
        """Stops the trace once `step`, the last traced one, has run on the device."""
        if self.tracing and step >= self.last:
            jax.block_until_ready(state)
            self.stop()

    def stop(self) -> None:
        if self.tracing:
            self.tracing = False
            jax.profiler.stop_trace()
            logging.info("profile written to %s (open with: tensorboard --logdir)", self.log_dir)

    def close(self) -> None:
        self.stop()
        if self.server:
            self.server = False
            jax.profiler.stop_server()
