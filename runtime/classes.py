"""Class labels of a run: a class given by index or case-insensitive name, or classes cycling over image indices."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from runtime.errors import SettingsError
from runtime.metadata import SamplingContract

Classes = int | str | Sequence[int | str] | None


def class_index(contract: SamplingContract, value: int | str) -> int:
    """A class given as an index or a (case-insensitive) name from the contract."""
    names = [n.lower() for n in contract.class_names]
    if isinstance(value, str) and not value.lstrip("-").isdigit():
        if value.lower() not in names:
            known = (", ".join(contract.class_names) if contract.class_names
                     else f"indices 0..{contract.num_classes - 1}")
            raise SettingsError(f"unknown class {value!r} (this model knows: {known})")
        return names.index(value.lower())
    index = int(value)
    if not 0 <= index < contract.num_classes:
        raise SettingsError(f"class {index} is out of range (this model has classes 0..{contract.num_classes - 1})")
    return index


def labels(contract: SamplingContract, indices: Sequence[int], classes: Classes) -> np.ndarray | None:
    """(B,) int64 class labels for the images ``indices`` (None for unconditional models).

    ``classes``: None cycles through the classes by image index; one class (index or case-insensitive name)
    for all; or one per image.
    """
    if not contract.conditional:
        if classes is not None:
            raise SettingsError("this model is unconditional: it takes no class")
        return None
    if classes is None:
        return np.asarray(indices, dtype=np.int64) % contract.num_classes
    if isinstance(classes, (int, str, np.integer)):
        return np.full(len(indices), class_index(contract, classes), dtype=np.int64)
    if len(classes) != len(indices):
        raise SettingsError(f"{len(classes)} classes given for {len(indices)} images")
    return np.array([class_index(contract, k) for k in classes], dtype=np.int64)
