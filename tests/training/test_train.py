"""train's model: the ModelConfig of the run with the data's size, channels and classes filled in."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from training.config import ModelConfig
from training.train import TrainError, TrainOptions, _config_for_data

TINY = dict(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,), dropout=0.0)
NAMES = [f"class {i}" for i in range(10)]
DATA = SimpleNamespace(size=28, depth=1, num_classes=10, classes=NAMES, name="fashion-mnist")


@pytest.mark.parametrize(
    "run, num_classes, class_names",
    [(dict(conditional=True), 10, tuple(NAMES)), (dict(), 0, None), (dict(num_classes=3), 3, None)],
)
def test_data_fills_the_data_dependent_fields(run, num_classes, class_names):
    model = ModelConfig(t_range=100, schedule="cosine", lr=1e-3, **TINY)
    cfg = _config_for_data(TrainOptions("fashion-mnist", model=model, **run), DATA)
    assert cfg == ModelConfig(28 * 28, 100, 1, schedule="cosine", lr=1e-3, num_classes=num_classes,
                              class_names=class_names, dataset="fashion-mnist", **TINY)


def test_conditional_with_other_class_count_is_refused():
    with pytest.raises(TrainError, match="drop --num-classes 3"):
        _config_for_data(TrainOptions("fashion-mnist", conditional=True, num_classes=3), DATA)
