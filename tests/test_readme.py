"""The README's Python blocks run as written, in order, in one namespace, on the built-in tiny
pipelines (so they cannot rot). Run in a temporary directory; the one file a block reads that
another command writes (`out/demo/lora`, what `make demo` leaves) is written first."""

import os
import re
from pathlib import Path

import jax

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[tuple[int, str]]:
    """`(line, source)` of every ```python block."""
    return [(text[:m.start()].count("\n") + 2, m.group(1))
            for m in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M)]


def write_demo_lora(folder: Path) -> None:
    from conversion import export_lora
    from conversion.pipeline import resolve
    from ctcal_jax import lora
    from ctcal_jax.sampling import load_pipeline

    pipe = load_pipeline(resolve("builtin:shapes-sd2"))
    export_lora(folder, {"unet": lora.init(jax.random.key(0), pipe.params["unet"], rank=2, alpha=2)})


def test_every_python_block_of_the_readme_runs(tmp_path, monkeypatch):
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 8
    monkeypatch.chdir(tmp_path)
    write_demo_lora(tmp_path / "out" / "demo" / "lora")
    namespace: dict = {"__name__": "readme"}
    for line, source in blocks:
        try:
            exec(compile(source, f"README.md:{line}", "exec"), namespace)  # noqa: S102 — the README's own code
        except Exception as e:  # noqa: BLE001 — name the block that failed
            raise AssertionError(f"README.md block at line {line} failed: {type(e).__name__}: {e}") from e
    assert os.path.isfile(tmp_path / "out" / "lora" / "pytorch_lora_weights.safetensors")
