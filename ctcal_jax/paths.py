"""Flax parameter paths <-> the diffusers / transformers module paths they mirror (SPEC §1).

Our modules are named after the PyTorch module paths with list indices joined by an underscore:
`down_blocks.0.attentions.1.proj_in` is the Flax path `("down_blocks_0", "attentions_1", "proj_in")`.
Only the names of PyTorch `ModuleList`/`Sequential` attributes (`LIST_NAMES`) take an index, so
the mapping is mechanical both ways. LoRA targets, LoRA files and checkpoint keys are written in
the dotted form; parameter trees and the `"lora"` collection are nested by the Flax path.
"""

from __future__ import annotations

from collections.abc import Iterable

Path = tuple[str, ...]

# Names of PyTorch ModuleList / Sequential attributes: `name_N` in Flax is `name.N` in PyTorch.
LIST_NAMES = frozenset({
    "down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers",
    "transformer_blocks", "single_transformer_blocks", "to_out", "to_add_out", "net", "layers",
    "block", "layer", "mid_block_resnets", "proj_out_layers",
})


def split_key(key: str) -> Path:
    """`down_blocks.0.attentions.1.proj_in.weight` -> (`down_blocks_0`, `attentions_1`, `proj_in`, `weight`)."""
    out: list[str] = []
    for part in key.split("."):
        if part.isdigit() and out:
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(part)
    return tuple(out)


def join_path(path: Path, list_names: Iterable[str] = LIST_NAMES) -> str:
    """Inverse of `split_key` for module paths: (`down_blocks_0`, `attentions_1`) -> `down_blocks.0.attentions.1`."""
    names = frozenset(list_names)
    parts = []
    for p in path:
        stem, _, idx = p.rpartition("_")
        parts.append(f"{stem}.{idx}" if idx.isdigit() and stem in names else p)
    return ".".join(parts)
