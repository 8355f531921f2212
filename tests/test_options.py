"""One options object for inference: each field is the eval.* key of its name, built once from
the config and taken whole by every consumer; invalid values are refused when it is built."""
import dataclasses

import pytest

from config_helpers import eval_settings
from segkit.config import inference_options
from segkit.errors import ConfigError
from segkit.inference.options import InferenceOptions
from segkit.settings import EvalSettings


def test_every_option_is_an_eval_key_of_its_name():
    # A new option is one field here and one in EvalSettings: from_settings copies by name.
    keys = {f.name for f in dataclasses.fields(EvalSettings)}
    assert {f.name for f in dataclasses.fields(InferenceOptions)} <= keys


def test_the_boundary_builds_the_options_from_eval_keys():
    job = eval_settings("eval.scales=[0.5,1.0]", "eval.flip=false", "eval.fusion=original",
                        "eval.window_placement=original", "eval.align_corners=false", "eval.max_batch=3",
                        "eval.max_size=640", "eval.amp=bf16", "eval.channels_last=false", "eval.fold_bn=false",
                        "eval.compile=true")
    assert inference_options(job) == InferenceOptions(
        scales=(0.5, 1.0), flip=False, fusion="original", window_placement="original", align_corners=False,
        max_batch=3, max_size=640, amp="bf16", dtype=None, channels_last=False, fold_bn=False, compile=True)
    defaults = inference_options(eval_settings())
    for f in dataclasses.fields(InferenceOptions):
        value = getattr(job.eval, f.name)
        assert getattr(inference_options(job), f.name) == (tuple(value) if isinstance(value, list) else value)
    assert defaults.flip is True and defaults.max_size == 2048  # eval's defaults, not the object's


@pytest.mark.parametrize("field,value,error,message", [
    ("fusion", "mean", ValueError, "fusion must be one of"),
    ("window_placement", "centre", ValueError, "window_placement must be one of"),
    ("scales", [], ValueError, "scales must be None or a non-empty list"),
    ("scales", [1.0, 0], ValueError, "scales must be None or a non-empty list"),
    ("scales", "1.0", ValueError, "scales must be None or a non-empty list"),
    ("max_batch", 0, ConfigError, "max_batch must be a positive integer or 'auto', got 0"),
    ("max_batch", True, ConfigError, "got True"),
    ("max_size", 0, ValueError, "max_size must be None or a positive integer"),
    ("amp", "fp8", ConfigError, "autocast dtype must be one of"),
    ("dtype", "int8", ConfigError, "model dtype must be one of"),
])
def test_invalid_options_are_refused_when_built(field, value, error, message):
    with pytest.raises(error, match=message):
        InferenceOptions(**{field: value})


def test_options_are_frozen_and_replace_revalidates():
    options = InferenceOptions(scales=[0.75, 1])
    assert options.scales == (0.75, 1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.flip = True
    assert options.replace(flip=True).flip and not options.flip
    with pytest.raises(ValueError, match="fusion"):
        options.replace(fusion="max")
