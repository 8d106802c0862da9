"""The cluster configs users launch raylight with, read the way `ray up` and KubeRay read them.

No cluster starts. Each cluster-launcher config (``cluster.yaml``, ``launch/aws.yaml``,
``launch/gcp.yaml``) goes through what ``ray up`` does before it touches a machine (fill in the
provider's defaults, then validate against the installed Ray's ``ray-schema.json``), and the
KubeRay ``RayJob``'s entrypoint goes through the example's own argument parser.
"""

from __future__ import annotations

import ast
import copy
import functools
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.runtime_env import RuntimeEnv

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER_CONFIGS = ["cluster.yaml", "launch/aws.yaml", "launch/gcp.yaml"]
RAYJOB = "launch/kuberay-rayjob.yaml"
INSTALLS_RAYLIGHT = re.compile(r'python -m pip install .*-e "\$HOME/src/raylight\[examples\]"')
EXPORTS_TOKEN_MODE = "echo 'export RAY_AUTH_MODE=token' >> ~/.bashrc"

# Mistakes `ray up` must refuse: (key, value) set at the top level of a working config.
MISTAKES = {
    "unknown top-level key": ("head_start_commands", ["ray start --head"]),
    "a string where a list goes": ("rsync_filter", ".gitignore"),
    "unknown key in auth": ("auth", {"ssh_usr": "ubuntu"}),
}


def _load(path: str) -> dict:
    return yaml.safe_load((ROOT / path).read_text())


@functools.cache
def _ray_schema() -> dict:
    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def _prepared(config: dict) -> dict:
    """The config as `ray up` uses it: provider defaults filled in, then validated."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def _strings(node) -> list[str]:
    if isinstance(node, dict):
        return [text for key, value in node.items() for text in _strings(key) + _strings(value)]
    if isinstance(node, list):
        return [text for item in node for text in _strings(item)]
    return [node] if isinstance(node, str) else []


def _flag(command: str, name: str) -> str | None:
    match = re.search(rf"--{name}[= ](\S+)", command)
    return match.group(1).strip("\"'") if match else None


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS)
def test_ray_up_accepts_the_config(path):
    config = _load(path)
    jsonschema.validate(config, _ray_schema())
    _prepared(config)


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
@pytest.mark.parametrize("path", LAUNCHER_CONFIGS)
def test_ray_up_rejects_the_config_with_a_mistake(path, mistake):
    config = _load(path)
    key, value = MISTAKES[mistake]
    config[key] = value
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, _ray_schema())
    with pytest.raises(jsonschema.ValidationError):
        _prepared(config)


@pytest.mark.parametrize("path", [*LAUNCHER_CONFIGS, RAYJOB])
def test_no_config_binds_anything_to_all_interfaces(path):
    assert not [text for text in _strings(_load(path)) if "0.0.0.0" in text]


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS)
def test_head_serves_the_dashboard_on_its_own_address(path):
    starts = [cmd for cmd in _load(path)["head_start_ray_commands"] if "ray start" in cmd]
    assert starts, f"{path}: no head start command runs `ray start`"
    for command in starts:
        dashboard_host = _flag(command, "dashboard-host")
        node_ip = _flag(command, "node-ip-address")
        assert dashboard_host and node_ip, f"{path}: {command}"
        assert dashboard_host == node_ip, f"{path}: the dashboard and the node bind apart"
        assert dashboard_host not in ("::", "localhost", "127.0.0.1"), command


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS)
def test_every_node_starts_ray_with_token_auth(path):
    config = _prepared(_load(path))
    # The token file travels with the project, the same file on every node.
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    # Ray sources ~/.bashrc before every command it runs on a node, start commands included.
    for setup, start in [
        ("head_setup_commands", "head_start_ray_commands"),
        ("worker_setup_commands", "worker_start_ray_commands"),
    ]:
        exported = any(EXPORTS_TOKEN_MODE in cmd for cmd in config[setup])
        for command in config[start]:
            if "ray start" in command:
                assert exported or "RAY_AUTH_MODE=token" in command, f"{path}: {command}"


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS)
def test_every_node_keeps_the_token_readable_by_its_owner_only(path):
    config = _prepared(_load(path))
    private = re.compile(r"^chmod (0?600|go-rwx) ~/\.ray/auth_token$")
    for setup in ("head_setup_commands", "worker_setup_commands"):
        assert any(private.match(cmd.strip()) for cmd in config[setup]), f"{path}: {setup}"


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS)
def test_every_node_gets_the_project_and_installs_it(path):
    config = _prepared(_load(path))
    assert config["file_mounts"].get("~/src/raylight") == "."
    assert ".gitignore" in config["rsync_filter"]
    for setup in ("head_setup_commands", "worker_setup_commands"):
        assert any(INSTALLS_RAYLIGHT.search(cmd) for cmd in config[setup]), f"{path}: {setup}"


def _parse_example_args(script: Path, argv: list[str]):
    """The example's own ``_parse_args(argv)``, run without the example's imports (torch alone
    takes seconds): only ``argparse`` and the module-level functions it calls are executed."""
    tree = ast.parse(script.read_text(), filename=str(script))
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    needed, pending = {}, ["_parse_args"]
    while pending:
        name = pending.pop()
        if name not in needed:
            needed[name] = functions[name]
            calls = [node.id for node in ast.walk(functions[name]) if isinstance(node, ast.Name)]
            pending += [call for call in calls if call in functions]
    body = [ast.Import([ast.alias("argparse")]), *needed.values()]
    module = ast.fix_missing_locations(ast.Module(body=body, type_ignores=[]))
    namespace = {"__doc__": ast.get_docstring(tree)}
    exec(compile(module, str(script), "exec"), namespace)
    return namespace["_parse_args"](argv)


def _worker_cpus(job: dict) -> float:
    """CPUs of all worker pods together, from their limits (Kubernetes quantities: "2", "500m")."""
    total = 0.0
    for group in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        cpu = str(group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
        total += group["replicas"] * (float(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu))
    return total


def _containers(job: dict) -> list[dict]:
    cluster = job["spec"]["rayClusterSpec"]
    templates = [cluster["headGroupSpec"]["template"]]
    templates += [group["template"] for group in cluster["workerGroupSpecs"]]
    if "submitterPodTemplate" in job["spec"]:
        templates.append(job["spec"]["submitterPodTemplate"])
    return [container for template in templates for container in template["spec"]["containers"]]


def test_rayjob_manifest_has_what_kuberay_needs():
    job = _load(RAYJOB)
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["metadata"]["name"]
    spec = job["spec"]
    assert spec["entrypoint"] and spec["shutdownAfterJobFinishes"] is True
    assert spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]
    assert spec["rayClusterSpec"]["workerGroupSpecs"]
    RuntimeEnv(**yaml.safe_load(spec["runtimeEnvYAML"]))  # what the submitter hands Ray
    for container in _containers(job):
        assert {"requests", "limits"} <= container["resources"].keys(), container["name"]


def test_rayjob_entrypoint_runs_an_example_with_flags_it_accepts():
    job = _load(RAYJOB)
    python, script, *argv = shlex.split(job["spec"]["entrypoint"])
    assert python == "python" and (ROOT / script).is_file(), job["spec"]["entrypoint"]
    args = _parse_example_args(ROOT / script, argv)
    # Each rank holds one CPU, and the head offers none: the worker pods need one for every rank.
    assert args.num_workers <= _worker_cpus(job)


def test_entrypoint_check_catches_a_flag_the_example_lacks():
    with pytest.raises(SystemExit):
        _parse_example_args(ROOT / "examples/mnist.py", ["--gpus", "2"])


def test_rayjob_every_container_authenticates_with_the_same_token():
    secrets = set()
    for container in _containers(_load(RAYJOB)):
        env = {item["name"]: item for item in container.get("env", [])}
        assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", container["name"]
        secret = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef")
        assert secret, f"{container['name']}: RAY_AUTH_TOKEN does not come from a Secret"
        secrets.add((secret["name"], secret["key"]))
    assert len(secrets) == 1, secrets
