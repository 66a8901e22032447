"""What the programs (`python -m ctcal_jax.train`, `python -m ctcal_jax.compile_check`) share: absl
flag parsing in which a bad `--config` (a missing file, an unknown key, a bad value) is one line on
stderr and exit status 1, not a traceback."""

from __future__ import annotations

import importlib
import sys
from typing import Any

from absl import flags

FLAGS = flags.FLAGS


def parse_flags(argv: list[str], required: list[str]) -> list[str]:
    """Parse `argv` into absl's FLAGS and load `--config` now; returns the arguments left over.

    The calling program defines `--config` (`config_flags.DEFINE_config_file`) and the `required`
    flags. Exits with `error: <one line>` for a flag error or a bad config.
    """
    flags.mark_flags_as_required(required)
    try:
        rest = FLAGS(argv)
        FLAGS.config.keys()  # the config file is loaded lazily: fail here, not inside the program
    except (flags.Error, OSError, AttributeError, KeyError, ValueError, TypeError) as e:
        # What flags and ml_collections raise for a missing file, an unknown key or a bad value; an
        # error inside a config's own code keeps its traceback.
        sys.exit(f"error: {config_error(e, argv)}")
    return rest


def config_error(e: Exception, argv: list[str]) -> str:
    """One line for a flag-parsing failure; an unknown config key is named as the user typed it."""
    text = " ".join(str(e.__cause__ or e).split())
    if isinstance(e, OSError):  # the config file itself: name it, with the reason's last line
        return f"--config {FLAGS['config'].config_filename}: {str(e).strip().splitlines()[-1].strip()}"
    if isinstance(e.__cause__ or e, (AttributeError, KeyError)):
        key = text.strip("\"'")
        typed = [a.split("=")[0] for a in argv if a.startswith("--config.") and a.split("=")[0].endswith("." + key)]
        where = typed[0] if typed else key
        return f"{where}: no such config key (every key is listed in ctcal_jax/config.py)"
    return text


def import_function(spec: str, what: str) -> Any:
    """`module:function` -> that function; ValueError naming `what` (the flag or key) and the problem."""
    module_name, sep, name = spec.partition(":")
    if not sep or not module_name or not name:
        raise ValueError(f"{what} {spec!r}: expected module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"{what} {spec!r}: cannot import {module_name!r} ({e})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"{what} {spec!r}: {module_name} has no function {name!r}")
    return fn
