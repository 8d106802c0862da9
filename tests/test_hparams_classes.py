"""Hyperparameters that hold classes and functions: saved as Lightning saves them, loaded
back weights_only, and nothing else a checkpoint names is let in.

The script-defined case runs for real: a driver script (its own ``__main__``) fits on two
Ray workers, whose ``__main__`` is Ray's, and the same script under pytorch-lightning writes
the checkpoint raylight's is compared with.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import types

import pytest
import torch
from models import Classifier

from raylight.shared import checkpoint

SCRIPT = '''
import glob
import json
import pickle
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

FRAMEWORK, OUT = sys.argv[1], sys.argv[2]
if FRAMEWORK == "lightning":
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint
else:
    import ray

    import raylight as pl
    from raylight.callbacks import ModelCheckpoint


class Encoder(nn.Module):
    def __init__(self, features, hidden):
        super().__init__()
        self.layer = nn.Linear(features, hidden)

    def forward(self, x):
        return self.layer(x)


def squash(x):
    return torch.tanh(x)


class Model(pl.LightningModule):
    def __init__(self, encoder_class=Encoder, activation=squash, features=4):
        super().__init__()
        self.save_hyperparameters()
        self.encoder = encoder_class(features, 3)
        self.head = nn.Linear(3, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.head(self.hparams.activation(self.encoder(x))), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader():
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 4, generator=generator), torch.randn(32, 1, generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=4)


def trainer(dirpath):
    callback = ModelCheckpoint(dirpath=dirpath, save_top_k=-1, save_last=True)
    common = dict(max_epochs=2, logger=False, enable_progress_bar=False,
                  enable_model_summary=False, callbacks=[callback])
    if FRAMEWORK == "lightning":
        return pl.Trainer(accelerator="cpu", devices=1, **common), callback
    return pl.Trainer(num_workers=2, **common), callback


def written(path):
    """How the checkpoint refers to the hyperparameters: its globals, and the hyperparameters
    pickled again as torch.save pickles them (a trusted file: this script wrote it)."""
    hparams = torch.load(path, weights_only=False)["hyper_parameters"]
    return {
        "globals": sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path)),
        "hparams_pickle": pickle.dumps(hparams, protocol=2).hex(),
    }


if FRAMEWORK == "raylight":
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="ERROR")
model = Model()
fit, callback = trainer(OUT)
fit.fit(model, loader())
report = written(callback.last_model_path) | {"last": callback.last_model_path}
if FRAMEWORK == "raylight":
    loaded = Model.load_from_checkpoint(callback.last_model_path)
    from_lightning = Model.load_from_checkpoint(sys.argv[3])
    report |= {
        "driver_keeps_class": model.hparams.encoder_class is Encoder,
        "loaded_class": loaded.hparams.encoder_class is Encoder,
        "loaded_function": loaded.hparams.activation is squash,
        "loaded_weights": all(
            torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items()
        ),
        "lightning_checkpoint_class": from_lightning.hparams.encoder_class is Encoder,
    }
    # The same workers take a new job (new copies of the script's functions) and resume.
    first_epoch = glob.glob(OUT + "/epoch=0-*.ckpt")[0]
    fit.fit(Model(), loader(), ckpt_path=first_epoch)
    # A new Trainer (its own ModelCheckpoint) resumes a new model and saves again.
    resumed = Model()
    again, again_callback = trainer(OUT + "/resumed")
    again.fit(resumed, loader(), ckpt_path=first_epoch)
    report |= {
        "refit_to_step": fit.global_step,
        "resumed_to_step": again.global_step,
        "resumed_weights": all(
            torch.equal(resumed.state_dict()[k], v) for k, v in model.state_dict().items()
        ),
        "resumed_checkpoint": written(again_callback.last_model_path),
    }
    again.shutdown()
    fit.shutdown()
    ray.shutdown()
print("REPORT " + json.dumps(report))
'''


def _run(script, *args: str) -> dict:
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    result = subprocess.run(
        [sys.executable, str(script), *args],
        env=env,
        cwd=script.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("REPORT "))
    return json.loads(line.removeprefix("REPORT "))


def test_script_classes_in_hparams_save_load_and_resume_as_in_lightning(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    # (folders not named like a package: the script's folder is first on sys.path)
    lightning = _run(script, "lightning", str(tmp_path / "pl_out"))
    ours = _run(script, "raylight", str(tmp_path / "ours_out"), lightning["last"])

    # Saved on a rank, whose __main__ is Ray's: by reference to the script's names.
    assert lightning["globals"] == ["__main__.Encoder", "__main__.squash"]
    assert ours["globals"] == lightning["globals"]
    assert ours["hparams_pickle"] == lightning["hparams_pickle"]
    assert ours["driver_keeps_class"]
    # Loaded weights_only in the script: the very class and function it defines.
    assert ours["loaded_class"] and ours["loaded_function"] and ours["loaded_weights"]
    assert ours["lightning_checkpoint_class"]
    # Resumed on the ranks (their __main__ lacks Encoder too), exactly, and saved from there.
    assert ours["refit_to_step"] == 8
    assert ours["resumed_to_step"] == 8 and ours["resumed_weights"]
    assert ours["resumed_checkpoint"] == {
        key: lightning[key] for key in ("globals", "hparams_pickle")
    }


class _Builds:
    """Pickles as a call of ``_leave_mark``: what a malicious checkpoint would hold."""

    def __init__(self, mark: str) -> None:
        self.mark = mark

    def __reduce__(self):
        return (_leave_mark, (self.mark,))


def _leave_mark(path: str) -> None:
    with open(path, "w") as file:
        file.write("ran")


def _saved(tmp_path, **entries) -> str:
    model = Classifier()
    path = str(tmp_path / "model.ckpt")
    torch.save({"state_dict": model.state_dict(), **entries}, path)
    return path


class WithActivation(Classifier):
    def __init__(
        self, activation: type[torch.nn.Module] = torch.nn.ReLU, pair=None, same_pair=None
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer[1] = activation()


def test_hparams_classes_from_imported_modules_load_weights_only(tmp_path):
    pair = (Classifier, [1])
    hparams = {"activation": torch.nn.Tanh, "pair": pair, "same_pair": pair}
    path = _saved(tmp_path, hyper_parameters=hparams)
    loaded = checkpoint.load(path)["hyper_parameters"]
    assert loaded == hparams and loaded["activation"] is torch.nn.Tanh
    assert loaded["pair"] is loaded["same_pair"]  # what pickle shared stays shared
    model = WithActivation.load_from_checkpoint(path)
    assert model.hparams.activation is torch.nn.Tanh and model.hparams.pair[0] is Classifier
    assert isinstance(model.layer[1], torch.nn.Tanh)


def test_unrelated_unsafe_globals_are_refused(tmp_path):
    mark = tmp_path / "mark"
    outside = _saved(tmp_path, hyper_parameters={"features": 8}, loader=_leave_mark)
    with pytest.raises(pickle.UnpicklingError, match=r"_leave_mark'\] outside its hyperparam"):
        Classifier.load_from_checkpoint(outside)

    # Inside the hyperparameters, but called while unpickling: refused, and nothing ran.
    called = _saved(tmp_path, hyper_parameters={"features": 8, "hook": _Builds(str(mark))})
    with pytest.raises(pickle.UnpicklingError, match="builds objects from them"):
        checkpoint.load(called)
    assert not mark.exists()

    # An instance of a class: built by unpickling, refused the same way.
    instance = _saved(tmp_path, hyper_parameters={"loss": torch.nn.MSELoss()})
    with pytest.raises(pickle.UnpicklingError, match="save_hyperparameters\\(ignore="):
        checkpoint.load(instance)


def test_hparams_naming_what_this_process_lacks_are_refused_clearly(tmp_path, monkeypatch):
    scratch = types.ModuleType("scratch_encoders")
    exec("class Encoder:\n    pass", scratch.__dict__)
    monkeypatch.setitem(sys.modules, "scratch_encoders", scratch)
    path = _saved(tmp_path, hyper_parameters={"encoder_class": scratch.Encoder})
    assert checkpoint.load(path)["hyper_parameters"]["encoder_class"] is scratch.Encoder

    # Loading imports nothing the checkpoint names: the module must be imported already.
    monkeypatch.delitem(sys.modules, "scratch_encoders")
    with pytest.raises(pickle.UnpicklingError, match="Encoder, which is not defined in this"):
        checkpoint.load(path)
    # The name is there, but not a class or function.
    monkeypatch.setitem(sys.modules, "scratch_encoders", scratch)
    monkeypatch.setattr(scratch, "Encoder", 3)
    with pytest.raises(pickle.UnpicklingError, match="which here is a int, not a class"):
        checkpoint.load(path)


def test_a_trusted_file_loads_whole_when_asked_as_with_torch_load(tmp_path, monkeypatch):
    """What weights_only loading refuses (an object in the hyperparameters) loads with
    weights_only=False, or with torch's own TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1."""
    path = _saved(tmp_path, hyper_parameters={"loss": torch.nn.MSELoss()})
    monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", raising=False)
    with pytest.raises(pickle.UnpicklingError, match="weights_only=False"):
        checkpoint.load(path)
    assert isinstance(
        checkpoint.load(path, weights_only=False)["hyper_parameters"]["loss"], torch.nn.MSELoss
    )
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    assert isinstance(checkpoint.load(path)["hyper_parameters"]["loss"], torch.nn.MSELoss)
    with pytest.raises(pickle.UnpicklingError):  # an explicit choice wins, as in torch.load
        checkpoint.load(path, weights_only=True)
