"""The storage interface: between what a checkpoint holds (planned by ``schema``, collected by
``checkpointer``) and the bytes. A backend is one class with two methods:

- ``write(target, comm, specs, parts, crcs, root_attrs)`` (collective over ``comm``): create
  ``target`` with the root attributes and every planned dataset (``schema.Spec``: name, shape,
  dtype, parts; each dataset's ``parts`` and ``crc32`` attributes from ``crcs``), each rank
  writing the parts it owns (``parts``: {dataset name: array}); a failure anywhere raises the
  same agreed error on every rank (``agree``);
- ``open(target)`` (this rank alone): a ``Source`` to read it back.

A ``Source`` is what the readers (``reader``, ``reshard``, ``export``, ``bounds``,
``checkpointer``) see of a stored checkpoint: its root ``attrs`` (a mapping), ``has(name)`` and
``dataset(name)`` (a ``Dataset``: ``shape``, ``dtype``, ``attrs``, ``read(sel)``,
``read_into(out, sel)``; None where the name is not a dataset), used as a context manager.
Nothing outside this interface sees an ``h5py.File``.

The HDF5 backends (``writer.ParallelHDF5``, ``writer.SerialHDF5``) keep the file format of
``schema``; ``H5Source`` is their reading side.
"""

from __future__ import annotations

from typing import Protocol

import h5py
import numpy as np


class Dataset(Protocol):
    shape: tuple
    dtype: np.dtype
    attrs: dict

    def read(self, sel=slice(None)) -> np.ndarray: ...
    def read_into(self, out: np.ndarray, sel=slice(None)) -> None: ...


class Source(Protocol):
    attrs: dict

    def has(self, name: str) -> bool: ...
    def dataset(self, name: str) -> Dataset | None: ...
    def close(self) -> None: ...
    def __enter__(self) -> "Source": ...
    def __exit__(self, *exc) -> None: ...


class Storage(Protocol):
    def write(self, target, comm, specs, parts: dict, crcs: dict, root_attrs: dict) -> None: ...
    def open(self, target) -> Source: ...


class H5Dataset:
    """One HDF5 dataset as a ``Dataset``."""

    def __init__(self, ds: h5py.Dataset):
        self.ds = ds
        self.shape, self.dtype, self.attrs = tuple(ds.shape), ds.dtype, ds.attrs

    def read(self, sel=slice(None)) -> np.ndarray:
        return self.ds[sel]

    def read_into(self, out: np.ndarray, sel=slice(None)) -> None:
        self.ds.read_direct(out, sel)


class H5Source:
    """An open HDF5 checkpoint file (read-only) as a ``Source``."""

    def __init__(self, path):
        self.f = h5py.File(path, "r")
        self.attrs = self.f.attrs

    def has(self, name: str) -> bool:
        return name in self.f

    def dataset(self, name: str) -> H5Dataset | None:
        obj = self.f.get(name)
        return H5Dataset(obj) if isinstance(obj, h5py.Dataset) else None

    def close(self) -> None:
        self.f.close()

    def __enter__(self) -> "H5Source":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
