"""Device mesh, parameter sharding rules, and host batch -> global jax.Array.

Mesh axes are ``data`` and ``fsdp`` (constants below). Parameters are sharded by regex rules from the
config (first match wins); batches are split over both axes along their leading dimension.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA, FSDP = "data", "fsdp"
BATCH_SPEC = P((DATA, FSDP))


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh of shape (data, fsdp) from ``{"data": n | -1, "fsdp": m | -1}`` (-1: the remaining devices).

    Axes are Auto (GSPMD propagation): objectives are written as if on one device.
    """
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    sizes = [int(mesh_cfg.get(DATA, -1)), int(mesh_cfg.get(FSDP, 1))]
    if sizes.count(-1) > 1:
        raise ValueError("config.mesh: at most one axis may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if n % known:
        raise ValueError(f"config.mesh={dict(mesh_cfg)} does not divide the {n} devices")
    sizes = [n // known if s == -1 else s for s in sizes]
    if int(np.prod(sizes)) != n:
        raise ValueError(f"config.mesh={dict(mesh_cfg)} uses {int(np.prod(sizes))} devices but {n} are present; "
                         f"set one axis to -1")
    return jax.make_mesh(tuple(sizes), (DATA, FSDP), axis_types=(AxisType.Auto, AxisType.Auto), devices=devices)


def path_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def fsdp_spec(shape: Sequence[int], fsdp_size: int, min_size: int = 2 ** 12) -> P:
    """Shards the largest dimension divisible by the fsdp axis; small tensors stay replicated."""
    if fsdp_size == 1 or int(np.prod(shape)) < min_size:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[dim] = FSDP
            return P(*spec)
    return P()


def tree_shardings(abstract_tree: Any, rules: Sequence[tuple[str, str]], mesh: Mesh) -> Any:
    """NamedSharding per leaf of ``abstract_tree`` by the first regex rule matching its path."""
    compiled = [(re.compile(pattern), how) for pattern, how in rules]

    def one(path, leaf):
        name = path_name(path)
        shape = getattr(leaf, "shape", ())
        for pattern, how in compiled:
            if pattern.fullmatch(name):
                if how == "fsdp":
                    return NamedSharding(mesh, fsdp_spec(shape, mesh.shape[FSDP]))
                if how == "replicate":
                    return NamedSharding(mesh, P())
                raise ValueError(f"unknown sharding tactic {how!r} for {name}; use 'fsdp' or 'replicate'")
        raise ValueError(f"no sharding rule matches parameter {name}; add a catch-all rule ('.*', 'replicate')")

    return jax.tree_util.tree_map_with_path(one, abstract_tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, BATCH_SPEC)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def to_global(host_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each host's local batch into global arrays split over (data, fsdp).

    Every process passes its own rows; the global batch is their concatenation in process order.
    """
    sharding = batch_sharding(mesh)

    def one(path, x):
        x = np.asarray(x)
        try:
            return jax.make_array_from_process_local_data(sharding, x)
        except ValueError as e:
            raise ValueError(f"batch field {path_name(path)} with local shape {x.shape} cannot be split over "
                             f"mesh {dict(mesh.shape)}: {e}") from None

    return jax.tree_util.tree_map_with_path(one, host_batch)
