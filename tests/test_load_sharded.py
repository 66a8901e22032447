"""Loading onto a mesh: `load_component(..., mesh=)` creates every parameter with the sharding its
rule gives, from slices of the memory-mapped checkpoint, with exactly the values of the unsharded
load, and without a full host copy of the model.

The 4×2 (`data`, `fsdp`) checks run in subprocesses with 8 fake CPU devices (XLA reads the device
count once, when JAX starts). On fake CPU devices the device buffers live in host RAM, so the memory
bound is: extra anonymous memory (`RssAnon`; the mapped file's pages are file-backed and not the
loader's copies) ≤ the device buffers created + the largest tensor + a small slack. Materialising
the model on the host and then `device_put`-ing it onto the mesh exceeds that bound by more than the
model's size; the test measures that too, so the bound is known to be able to fail.

The loaded arrays must own their memory: the CPU backend adopts an aligned host array instead of
copying it, so a loader handing it views of the mapped file would return parameters that change when
the file is rewritten in place. The files here are written with every tensor 64-byte aligned, and
the tests rewrite them after loading.
"""

from __future__ import annotations

import gc
import json
import os
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import conversion.load
from conversion import files, load_component, names
from conversion import unet as unet_family
from ctcal_jax.sharding import DEFAULT_RULES, make_mesh, param_shardings

# An SD-layout UNet of 50 MB in fp32 (324 tensors, the largest 2.5 MB). Every tensor is a multiple of
# 64 bytes (hence 16 output channels), so with `write_aligned` every tensor starts 64-byte aligned.
UNET = {
    "_class_name": "UNet2DConditionModel", "in_channels": 4, "out_channels": 16, "sample_size": 32,
    "block_out_channels": [96, 192, 192], "layers_per_block": 1, "norm_num_groups": 32,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "attention_head_dim": 8, "cross_attention_dim": 128, "use_linear_projection": True,
}
TINY = {**UNET, "block_out_channels": [32, 32, 32], "norm_num_groups": 8, "cross_attention_dim": 16}
WEIGHTS = "diffusion_pytorch_model.safetensors"
# Python objects, JAX's per-call bookkeeping, allocator rounding: what a load may add besides copies.
SLACK = 8 * 2**20


def write_aligned(file: Path, tensors: dict[str, np.ndarray]) -> None:
    """`files.write_safetensors` with the header padded (through its metadata) so that the data
    starts on a 64-byte boundary: the case where the CPU backend can alias a view of the mapped file."""
    files.write_safetensors(file, tensors, {"pad": ""})
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        used = len(f.read(n).rstrip(b" "))
    files.write_safetensors(file, tensors, {"pad": " " * ((56 - used) % 64)})


def write_unet(folder: Path, config: dict = UNET, *, dtype=np.float32, shards: int = 1, seed: int = 0) -> Path:
    """A diffusers UNet folder with seeded random weights, written without torch; `shards > 1`
    writes a `*.safetensors.index.json` folder with the tensors spread over that many files."""
    module = unet_family.build(config)
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32).astype(dtype),
                          unet_family.abstract_params(module, config))
    state = names.flax_to_torch(params)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    if shards == 1:
        write_aligned(folder / WEIGHTS, state)
        return folder
    keys, weight_map = sorted(state), {}
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        write_aligned(folder / name, {k: state[k] for k in keys[i::shards]})
        weight_map.update(dict.fromkeys(keys[i::shards], name))
    (folder / f"{WEIGHTS}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


# ---- run in the 8-device subprocess ------------------------------------------------------------


def rss_anon() -> int:
    """Resident anonymous memory of this process, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


class PeakAnon:
    """The peak of `rss_anon()` above its value at construction: sampled by a thread, and by
    `sample()` (called from every shard callback of `jax.make_array_from_callback`)."""

    def __init__(self):
        self.base = self.peak = rss_anon()
        self._run = True
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def sample(self) -> None:
        self.peak = max(self.peak, rss_anon())

    def _loop(self) -> None:
        while self._run:
            self.sample()
            time.sleep(2e-4)

    def stop(self) -> int:
        self._run = False
        self._thread.join()
        self.sample()
        return self.peak - self.base


def child_memory(folder: str, how: str) -> None:
    """Print the extra anonymous memory of one load onto the 4×2 mesh, the bytes of the device
    buffers it made and its largest tensor. `how`: "mesh" (`load_component(mesh=)`) or
    "materialise" (the unsharded load, then `jax.device_put` onto the shardings)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    mesh = make_mesh(4, 2)
    # Start the devices, their transfer paths and JAX's tracing before the baseline: what any
    # first use of JAX costs is not the loader's.
    for spec in (P(), P("fsdp"), P(None, "fsdp")):
        jax.block_until_ready(jax.make_array_from_callback(
            (8, 8), NamedSharding(mesh, spec), lambda i: np.zeros((8, 8), np.float32)[i]))
    jax.block_until_ready(jax.device_put(jnp.zeros((8, 8)), NamedSharding(mesh, P("fsdp"))))
    unet_family.abstract_params(unet_family.build(UNET), UNET)
    gc.collect()

    peak = PeakAnon()
    make = jax.make_array_from_callback

    def sampled(shape, sharding, callback, dtype=None):
        def read(index):
            out = callback(index)
            peak.sample()
            return out
        return make(shape, sharding, read, dtype=dtype)

    jax.make_array_from_callback = sampled
    if how == "mesh":
        _, params = load_component(folder, "unet", mesh=mesh)
    else:
        _, unsharded = load_component(folder, "unet")
        params = jax.device_put(unsharded, param_shardings(unsharded, DEFAULT_RULES, mesh))
    jax.block_until_ready(params)
    extra = peak.stop()
    leaves = jax.tree.leaves(params)
    # Devices holding the same slice may share one host buffer (the CPU backend aliases an aligned
    # array it is given): count each buffer once.
    buffers = {s.data.unsafe_buffer_pointer(): s.data.nbytes for x in leaves for s in x.addressable_shards}
    print(json.dumps({
        "extra": extra,
        "buffers": sum(buffers.values()),
        "largest": max(x.nbytes for x in leaves),
        "model": sum(x.nbytes for x in leaves),
    }))


def child_exact(pairs: list[list[str]]) -> None:
    """For each (folder, reference folder): the mesh load of `folder` has the rules' shardings and
    equals the unsharded load of the reference exactly; also, the shard arrays own their memory
    (rewriting the file in place afterwards changes nothing)."""
    mesh = make_mesh(4, 2)
    for folder, reference in pairs:
        _, ref = load_component(reference, "unet")
        _, params = load_component(folder, "unet", mesh=mesh)
        want = param_shardings(ref, DEFAULT_RULES, mesh)
        assert jax.tree.structure(params) == jax.tree.structure(ref)
        split = 0
        for (path, x), s, r in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(want),
                                   jax.tree.leaves(ref)):
            name = jax.tree_util.keystr(path)
            assert x.sharding == s, (folder, name, x.sharding, s)
            assert x.dtype == r.dtype == jnp.float32, (name, x.dtype)
            np.testing.assert_array_equal(np.asarray(x), np.asarray(r), err_msg=f"{folder} {name}")
            split += not s.is_fully_replicated
        assert split > 100, f"{folder}: only {split} parameters are split over `fsdp`"
        for file in Path(folder).glob("*.safetensors"):
            with open(file, "r+b") as f:
                f.seek(4096)
                f.write(bytes(file.stat().st_size - 4096))
        for x, r in zip(jax.tree.leaves(params), jax.tree.leaves(ref)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(r), err_msg=f"{folder} after rewrite")
    print(json.dumps({"checked": len(pairs)}))


def _run_child(call: str, *args) -> dict:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    tests = Path(__file__).parent
    script = (f"import sys; sys.path.insert(0, {str(tests)!r}); import jax; assert jax.device_count() == 8; "
              f"import test_load_sharded as t; t.{call}(*{args!r})")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600,
                          cwd=str(tests.parent))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- tests ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded_load")
    return {
        "fp32": write_unet(root / "fp32"),
        "bf16": write_unet(root / "bf16", dtype=ml_dtypes.bfloat16),
        "index": write_unet(root / "index", shards=3),  # the fp32 weights again, over three files
    }


def test_mesh_load_has_the_rules_shardings_and_the_unsharded_values(folders, tmp_path):
    # child_exact rewrites the files it loads: give it copies.
    pairs = []
    for kind in ("fp32", "bf16", "index"):
        copy = tmp_path / kind
        copy.mkdir()
        for file in folders[kind].iterdir():
            (copy / file.name).write_bytes(file.read_bytes())
        pairs.append([str(copy), str(folders["fp32" if kind == "index" else kind])])
    assert _run_child("child_exact", pairs) == {"checked": 3}


@pytest.mark.parametrize("kind", ["fp32", "bf16", "index"])
def test_mesh_load_host_memory_stays_within_buffers_plus_one_tensor(folders, kind):
    new = _run_child("child_memory", str(folders[kind]), "mesh")
    bound = new["buffers"] + new["largest"] + SLACK
    assert new["model"] > 40 * 2**20  # far above the slack: the bound separates the two loaders
    assert new["extra"] <= bound, f"{new['extra'] / 2**20:.1f} MiB > bound {bound / 2**20:.1f} MiB: {new}"
    if kind == "fp32":
        # The bound fails a loader that holds the whole model on the host before placing it.
        old = _run_child("child_memory", str(folders[kind]), "materialise")
        assert old["extra"] > old["buffers"] + old["largest"] + SLACK, f"materialise stayed within: {old}"


# ---- one device, in this process ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_unet(tmp_path_factory.mktemp("tiny") / "unet", TINY)


def test_default_placement_unchanged_and_params_own_their_memory(tiny, tmp_path):
    folder = tmp_path / "unet"
    folder.mkdir()
    for file in tiny.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    state, _ = files.read_safetensors(folder / WEIGHTS)
    expected = names.torch_to_flax({k: np.array(v) for k, v in state.items()},
                                   unet_family.abstract_params(unet_family.build(TINY), TINY), source="ref")
    del state
    _, params = load_component(folder, "unet")
    _, bf16 = load_component(folder, "unet", dtype=jnp.bfloat16)
    _, on_mesh = load_component(folder, "unet", mesh=make_mesh(1, 1, jax.devices()[:1]))
    # Zeroing the file in place must not reach the loaded arrays (the CPU backend would alias a
    # view of the mapped file if the loader handed it one).
    with open(folder / WEIGHTS, "r+b") as f:
        f.seek(4096)
        f.write(bytes((folder / WEIGHTS).stat().st_size - 4096))
    for x, b, m, e in zip(*map(jax.tree.leaves, (params, bf16, on_mesh, expected))):
        assert not x.committed and x.devices() == {jax.devices()[0]} and x.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(x), np.asarray(e, np.float32))
        np.testing.assert_array_equal(np.asarray(b), np.asarray(e).astype(jnp.bfloat16))
        assert m.committed and m.sharding.is_fully_replicated
        np.testing.assert_array_equal(np.asarray(m), np.asarray(e, np.float32))


def test_mesh_load_checks_names_and_shapes_before_reading_and_rules(tiny, tmp_path, monkeypatch):
    mesh = make_mesh(1, 1, jax.devices()[:1])
    (tmp_path / "config.json").write_text(json.dumps({**TINY, "cross_attention_dim": 24}))
    (tmp_path / WEIGHTS).symlink_to(tiny / WEIGHTS)
    with monkeypatch.context() as m, pytest.raises(ValueError) as e:
        m.setattr(conversion.load, "_read", lambda *a: pytest.fail("tensor data read before the check"))
        load_component(tmp_path, "unet", mesh=mesh)
    msg = str(e.value)
    assert str(tmp_path) in msg and "attn2.to_k.weight" in msg and "(32, 16)" in msg and "(24, 32)" in msg
    with pytest.raises(ValueError, match="no rule matches parameter 'conv_in/bias'"):
        load_component(tiny, "unet", mesh=mesh, rules=[(r".*/kernel$", ("fsdp_largest",))])
    with pytest.raises(ValueError, match="pass mesh="):
        load_component(tiny, "unet", rules=DEFAULT_RULES)


def test_pickle_weights_on_opt_in_are_placed_on_the_mesh(tiny, tmp_path):
    torch = pytest.importorskip("torch")
    state, _ = files.read_safetensors(tiny / WEIGHTS)
    (tmp_path / "config.json").write_text((tiny / "config.json").read_text())
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, tmp_path / "diffusion_pytorch_model.bin")
    mesh = make_mesh(1, 1, jax.devices()[:1])
    _, params = load_component(tmp_path, "unet", mesh=mesh, allow_pickle=True)
    _, ref = load_component(tiny, "unet")
    for x, s, r in zip(*map(jax.tree.leaves, (params, param_shardings(ref, DEFAULT_RULES, mesh), ref))):
        assert x.sharding == s
        np.testing.assert_array_equal(np.asarray(x), np.asarray(r))
