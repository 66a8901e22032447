"""Train-state checkpoints: orbax's `CheckpointManager`, async, the newest `keep` kept.

A checkpoint holds the train state (`{"step", "params", "opt_state"}`, each array with its sharding:
every host writes and reads only its shards) and the data iterator's state (grain's, with its count
of skipped rows). Orbax writes a step into a temporary folder and renames it when complete, so a
process killed mid-write leaves the previous checkpoint as the newest; the RNG needs no saving, the
step derives it from the seed and the step number.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


class Checkpoints:
    """`save(step, state, loader)` (async), `restore(step, like, shardings, loader)`, `latest_step()`, `wait()`."""

    def __init__(self, directory: str | Path, keep: int = 3):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=True)
        self.manager = ocp.CheckpointManager(Path(directory).absolute(), options=options, item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, loader: Any) -> None:
        """Start writing `state` and the loader's position as checkpoint `step` (returns at once)."""
        if step in self.manager.all_steps():
            return
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        data=grain.checkpoint.CheckpointSave(loader)))

    def restore(self, step: int, like: Any, shardings: Any, loader: Any) -> Any:
        """The state of checkpoint `step` (structure and dtypes of `like`, placed with `shardings`);
        `loader` is moved to where it was when the checkpoint was taken."""
        target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), like, shardings)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=grain.checkpoint.CheckpointRestore(loader)))
        return restored["state"]

    def wait(self) -> None:
        """Block until the async saves have been written."""
        self.manager.wait_until_finished()
