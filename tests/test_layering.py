"""One direction of imports (STYLE): `conversion` depends on `ctcal_jax`, never the reverse.

The library (models, attention, lora, text, ctcal, the train step, ...) knows nothing of file
formats. Only the programs a user runs (`python -m ctcal_jax.<name>`), which load diffusers folders
and write LoRA files, use both packages; they are listed here by name.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Entry points: `python -m ctcal_jax.train` (the trainer), `python -m ctcal_jax.prepare` (data
# preparation), `python -m ctcal_jax.compile_check` (a config's step compiled with abstract weights),
# `python -m ctcal_jax.sample` (the sampler: reads LoRA files), `python -m ctcal_jax.pretrain_shapes`
# (writes the shapes world's base models as diffusers folders);
# and `ctcal_jax.sampling`, whose `load_pipeline(path)` (API.md) reads a diffusers folder: it imports
# `conversion` inside that function and `generate`'s LoRA-file branch only.
PROGRAMS = {"ctcal_jax/prepare.py", "ctcal_jax/train.py", "ctcal_jax/compile_check.py", "ctcal_jax/sampling.py",
            "ctcal_jax/sample.py", "ctcal_jax/pretrain_shapes.py", "ctcal_jax/experiments/shapes.py"}


def imported_packages(file: Path) -> set[str]:
    tree = ast.parse(file.read_text(), filename=str(file))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_the_library_imports_nothing_from_conversion():
    offenders = sorted(str(f.relative_to(ROOT)) for f in (ROOT / "ctcal_jax").rglob("*.py")
                       if str(f.relative_to(ROOT)) not in PROGRAMS and "conversion" in imported_packages(f))
    assert not offenders, f"ctcal_jax modules importing conversion (move the code, or pass loaded modules): {offenders}"


def test_the_programs_listed_exist():
    assert all((ROOT / p).is_file() for p in PROGRAMS)
