"""The driver's code reaches workers on another machine; differing package versions are named.

The "other machine" is a real second Ray node on another address (127.0.0.2) whose view of
the filesystem lacks the user's project folder (an empty tmpfs over it), and whose Python
imports a raylight of another version (first on its PYTHONPATH).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cluster import LocalCluster, can_hide_paths

import raylight
from raylight.driver.connect import code_for_the_cluster
from raylight.shared import shipping

FAR_IP = "127.0.0.2"
FAR_VERSION = "0.0.0+far"

MODEL = """
import os
import ray
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
import raylight as pl


class Model(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 2)

    def on_train_start(self):
        # Where this rank imported the user's module from, and whether it sees the project.
        print("PLACE " + __import__("json").dumps({
            "rank": self.global_rank,
            "ip": ray.util.get_node_ip_address(),
            "module_file": __file__,
            "sees_project": os.path.isfile(os.path.join(PROJECT_DIR, "mymodel.py")),
        }), flush=True)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=generator)
    return DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=8)
"""

TRAIN = """
import sys, warnings
import raylight as pl
from mymodel import Model, loader  # a sibling file: on the driver's machine only

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    trainer = pl.Trainer(num_workers=2, max_epochs=1, default_root_dir=sys.argv[1],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(Model(), loader())
for warning in caught:
    print("WARNING " + str(warning.message))
print("STEPS", trainer.global_step)
"""


def _far_raylight(folder: Path) -> Path:
    """A copy of raylight that says it is another version."""
    package = folder / "raylight"
    shutil.copytree(os.path.dirname(raylight.__file__), package)
    init = package / "__init__.py"
    text = init.read_text().replace(
        f'__version__ = "{raylight.__version__}"', f'__version__ = "{FAR_VERSION}"'
    )
    assert FAR_VERSION in text
    init.write_text(text)
    return folder


@pytest.mark.slow
@pytest.mark.e2e
def test_user_code_reaches_another_machine_and_version_differences_are_named(tmp_path):
    if not can_hide_paths():
        pytest.skip("needs root and unshare(1) to give a node its own filesystem view")
    project = tmp_path / "project"
    project.mkdir()
    (project / "mymodel.py").write_text(f"PROJECT_DIR = {str(project)!r}\n" + MODEL)
    (project / "train.py").write_text(TRAIN)
    far_site = _far_raylight(tmp_path / "far-site")
    cluster = LocalCluster()
    try:
        cluster.start_head(num_cpus=1)  # one rank on the driver's machine
        cluster.add_node(
            num_cpus=1,
            node_ip=FAR_IP,
            hide=(str(project),),
            env={"PYTHONPATH": str(far_site)},
        )
        env = cluster.env()
        env.pop("PYTHONPATH", None)
        result = subprocess.run(
            [sys.executable, "train.py", str(tmp_path / "runs")],
            cwd=project,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        cluster.shutdown()
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "STEPS 4" in result.stdout  # 64 samples / 2 ranks / batch 8
    # Ray may append a note to a printed line; two nodes sharing one machine's session
    # folder may both forward the same line.
    decode = json.JSONDecoder().raw_decode
    found = [decode(x.split("PLACE ", 1)[1])[0] for x in output.splitlines() if "PLACE " in x]
    places = list({p["rank"]: p for p in found}.values())
    assert sorted(p["rank"] for p in places) == [0, 1], output[-4000:]
    far = [p for p in places if p["ip"] == FAR_IP]
    assert len(far) == 1, output[-4000:]
    # The far rank could not see the project, yet imported mymodel: from what Ray shipped.
    assert not far[0]["sees_project"]
    assert not far[0]["module_file"].startswith(str(project))
    (near,) = [p for p in places if p["ip"] != FAR_IP]
    assert near["module_file"] == str(project / "mymodel.py")  # nothing shipped to it
    assert (
        f"node {FAR_IP} has raylight {FAR_VERSION} (driver: {raylight.__version__})"
        in result.stdout
    ), output[-4000:]


def test_user_code_is_what_the_driver_imported_from_outside_installed_places(tmp_path):
    (tmp_path / "helper_mod_for_shipping.py").write_text("VALUE = 1\n")
    (tmp_path / "helper_pkg_for_shipping").mkdir()
    (tmp_path / "helper_pkg_for_shipping" / "__init__.py").write_text("")
    (tmp_path / "helper_pkg_for_shipping" / "inner.py").write_text("")
    sys.path.insert(0, str(tmp_path))
    try:
        import helper_mod_for_shipping  # noqa: F401
        import helper_pkg_for_shipping.inner  # noqa: F401

        code = shipping.user_code()
    finally:
        sys.path.remove(str(tmp_path))
        for name in ("helper_mod_for_shipping", "helper_pkg_for_shipping.inner",
                     "helper_pkg_for_shipping"):  # fmt: skip
            sys.modules.pop(name, None)
    assert str(tmp_path / "helper_mod_for_shipping.py") in code
    assert str(tmp_path / "helper_pkg_for_shipping") in code  # the package, once
    assert not [c for c in code if "helper_pkg_for_shipping" in c and c.endswith("inner.py")]
    # Installed packages and raylight itself stay where they are installed.
    import torch

    assert not [c for c in code if c.startswith(os.path.dirname(os.path.dirname(torch.__file__)))]
    assert os.path.dirname(raylight.__file__) not in code


def test_version_mismatches_name_both_versions():
    driver = {"raylight": "0.1.0", "torch": "2.14.1", "ray": "2.60.0"}
    nodes = {
        "10.0.0.2": dict(driver),
        "10.0.0.3": {**driver, "torch": "2.13.0", "raylight": "0.0.9"},
    }
    nodes["10.0.0.4"] = {**driver, "torch": "2.14.1+cu128"}  # the same release, a GPU build
    assert shipping.version_mismatches(driver, nodes) == [
        "node 10.0.0.3 has raylight 0.0.9 (driver: 0.1.0), torch 2.13.0 (driver: 2.14.1)"
    ]


def test_a_symlinked_package_is_shipped_under_the_name_it_is_imported_by(tmp_path):
    (tmp_path / "real_pkg_for_shipping").mkdir()
    (tmp_path / "real_pkg_for_shipping" / "__init__.py").write_text("")
    (tmp_path / "link_pkg_for_shipping").symlink_to(tmp_path / "real_pkg_for_shipping")
    sys.path.insert(0, str(tmp_path))
    try:
        import link_pkg_for_shipping  # noqa: F401

        code = shipping.user_code()
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("link_pkg_for_shipping", None)
    assert str(tmp_path / "link_pkg_for_shipping") in code
    assert str(tmp_path / "real_pkg_for_shipping") not in code


def test_a_runtime_env_of_the_users_gets_the_modules_unless_it_carries_code(monkeypatch):
    monkeypatch.setattr(shipping, "user_code", lambda: ["/project/mymodel.py"])
    env_vars = {"env_vars": {"NCCL_DEBUG": "INFO"}}
    assert code_for_the_cluster({"runtime_env": env_vars}) == {
        "runtime_env": {"env_vars": {"NCCL_DEBUG": "INFO"}, "py_modules": ["/project/mymodel.py"]}
    }
    assert code_for_the_cluster({}) == {"runtime_env": {"py_modules": ["/project/mymodel.py"]}}
    assert code_for_the_cluster({"runtime_env": {"working_dir": "."}}) == {}
    assert code_for_the_cluster({"runtime_env": {"py_modules": ["/lib"]}}) == {}
