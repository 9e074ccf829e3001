"""One error family: every exception class clipzsl defines derives from ClipzslError, and the errors
raised on purpose (a bad argument, option or file) are ClipzslErrors that still are the built-in class
they replaced, so `except ValueError` in older code keeps working."""
import importlib
import inspect
import pkgutil

import numpy as np
import pytest
import torch

import clipzsl
from clipzsl import ClipzslError, InputError
from clipzsl.adapter import AdapterConfig, CrossAttentionAdapter, resolve_adapter
from clipzsl.backends import load_model
from clipzsl.backends.base import resolve_device, resolve_precision
from clipzsl.backends.hub import hub_error
from clipzsl.backends.packaged import read_cached, weights_path
from clipzsl.errors import InputTypeError
from clipzsl.maps import grid_of
from clipzsl.head import probabilities, top_k, zero_shot_head
from clipzsl.images import EmbeddedImages, check_output, embed_images

def library_modules():
    for info in pkgutil.walk_packages(clipzsl.__path__, "clipzsl."):
        yield importlib.import_module(info.name)


def test_every_exception_class_of_the_library_derives_from_clipzsl_error():
    classes = {obj for module in library_modules() for _, obj in inspect.getmembers(module, inspect.isclass)
               if issubclass(obj, BaseException) and obj.__module__.startswith("clipzsl")
               and not obj.__name__.startswith("_") and not issubclass(obj, Warning)}
    assert {"InputError", "PromptFileError", "AdapterError", "ImageLoadError", "ModelUnavailable"} <= \
        {c.__name__ for c in classes}
    assert [c.__qualname__ for c in classes if not issubclass(c, ClipzslError)] == []


class _Model:
    """Just enough of a Backend for the argument checks that come before any forward pass."""

    embed_dim, batch_size, workers, spec, fingerprint = 4, 2, 1, "fake", "fp"


@pytest.mark.parametrize("call, builtin", [
    (lambda: resolve_device("gpu7"), ValueError),
    (lambda: resolve_device("cuda:99"), ValueError),
    (lambda: resolve_precision("fp8", "cpu"), ValueError),
    (lambda: resolve_precision("fp16", "cpu"), ValueError),
    (lambda: load_model("nonsense:x"), ValueError),
    (lambda: load_model("packaged+zoom"), ValueError),
    (lambda: load_model("packaged", batch_size=0), ValueError),
    (lambda: weights_path("lite9"), ValueError),
    (lambda: AdapterConfig(dim=8, heads=3), ValueError),
    (lambda: AdapterConfig(dim=8, dropout=1.0), ValueError),
    (lambda: CrossAttentionAdapter(4).save("/nonexistent"), ValueError),
    (lambda: CrossAttentionAdapter(4).head(EmbeddedImages(torch.zeros(1, 4)), torch.zeros(2, 4), 1.0), ValueError),
    (lambda: resolve_adapter(42, _Model()), TypeError),
    (lambda: probabilities(torch.zeros(1, 2), "tanh"), ValueError),
    (lambda: top_k(zero_shot_head, EmbeddedImages(torch.zeros(1, 4)), torch.zeros(0, 4), 1.0, 0.0, "softmax", 1),
     ValueError),
    (lambda: grid_of(torch.zeros(5)), ValueError),
    (lambda: embed_images(_Model(), [], batch_size=0), ValueError),
    (lambda: embed_images(_Model(), [], decode="gpu"), ValueError),
    (lambda: hub_error("hf:some/model"), RuntimeError),
])
def test_a_deliberate_error_is_a_clipzsl_error_and_keeps_its_builtin_class(call, builtin):
    with pytest.raises(ClipzslError) as caught:
        error = call()
        if isinstance(error, Exception):  # hub_error builds the error its callers raise
            raise error
    assert isinstance(caught.value, builtin)
    assert str(caught.value)


def test_an_output_among_the_inputs_is_an_input_error(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    with pytest.raises(InputError, match="is the input"):
        check_output(tmp_path / "a.png", [str(tmp_path / "a.png")])


def test_a_damaged_cached_array_is_an_input_error(tmp_path):
    path = tmp_path / "arr.npy"
    np.save(path, np.zeros(3, np.float32))
    with pytest.raises(InputError, match="no checksum recorded"):
        read_cached(path, (3,))


def test_a_wrong_adapter_type_is_still_a_type_error():
    assert issubclass(InputTypeError, TypeError) and issubclass(InputTypeError, InputError)


def test_the_command_line_gives_one_line_for_a_clipzsl_error_and_a_traceback_for_a_bug(monkeypatch, capsys):
    from clipzsl.cli import main, tools

    def refuse():
        raise InputError("no such thing; give another")

    monkeypatch.setattr(tools, "available_models", refuse)
    assert main(["models"]) == 2
    assert capsys.readouterr().err == "clipzsl: error: no such thing; give another\n"

    def disk_full():
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tools, "available_models", disk_full)
    assert main(["models"]) == 2
    assert "No space left on device" in capsys.readouterr().err

    def bug():
        raise ValueError("a tensor of the wrong shape")  # not a ClipzslError: a bug, never a "user error"

    monkeypatch.setattr(tools, "available_models", bug)
    with pytest.raises(ValueError, match="wrong shape"):
        main(["models"])


def test_the_library_notices_reach_the_command_line_through_logging(monkeypatch, capsys):
    import logging

    from clipzsl.cli import main, tools

    def notice():
        logging.getLogger("clipzsl.backends").info("building something once")
        logging.getLogger("clipzsl.store").warning("a damaged file was set aside")
        return [("packaged", "offline")]

    monkeypatch.setattr(tools, "available_models", notice)
    assert main(["models"]) == 0
    assert capsys.readouterr().err == "clipzsl: building something once\nclipzsl: warning: a damaged file was set aside\n"
    assert not [h for h in logging.getLogger("clipzsl").handlers if isinstance(h, logging.StreamHandler)
                and not isinstance(h, logging.NullHandler)]  # removed after the command
