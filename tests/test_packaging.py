"""Installing: the dependency ranges cover the versions tested, a wheel carries the shipped
configs and `--config default` finds them outside the checkout, the README says how to install
for CPU and GPU, and the test run filters exactly one foreign warning."""
import os
import re
import subprocess
import sys
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent


def project():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_dependency_has_a_tested_range_that_holds_the_pinned_versions():
    pinned = [Requirement(line) for line in (ROOT / "requirements" / "ci.txt").read_text().splitlines()
              if "==" in line and not line.startswith("#")]
    pins = {pin.name: str(pin.specifier).removeprefix("==") for pin in pinned}
    table = project()["project"]
    requirements = [Requirement(text) for text in table["dependencies"]]
    requirements += [Requirement(text) for extra in table["optional-dependencies"].values() for text in extra]
    for requirement in requirements:
        assert requirement.specifier, f"{requirement.name}: no version range"
        if requirement.name in pins:
            assert requirement.specifier.contains(pins[requirement.name], prereleases=True), requirement
    for requirement in requirements[:len(table["dependencies"])]:
        assert any(spec.operator == "<" for spec in requirement.specifier), f"{requirement.name}: no upper bound"
        installed = metadata.version(requirement.name).split("+")[0]
        assert requirement.specifier.contains(installed), f"{requirement.name} {installed} is outside {requirement}"


def test_the_readme_says_how_to_install_on_each_platform():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Install"):]
    section = section[:section.index("\n## ", 3)]
    assert "download.pytorch.org/whl/cpu" in section and "--no-build-isolation" in section
    assert "macOS" in section and "Windows" in section and "mixture-of-sequence" in section
    assert "--config default" in (ROOT / "docs" / "lab.md").read_text()


def test_the_metadata_installs_off_this_machine():
    """A distribution name that is not PyPI's other "mos", triton only where it has wheels, a Python
    floor that the dependency ranges allow, the lab's libraries in an extra, a console script that
    resolves, and every install hint in a message naming this distribution and one of its extras."""
    import importlib

    from packaging.specifiers import SpecifierSet

    table = project()["project"]
    assert table["name"] == "mixture-of-sequence"
    core = {Requirement(text).name: Requirement(text) for text in table["dependencies"]}
    assert set(core) == {"torch", "numpy", "triton", "filelock"}
    linux, mac, windows = ({"sys_platform": name} for name in ("linux", "darwin", "win32"))
    assert core["triton"].marker.evaluate(linux) and not core["triton"].marker.evaluate(mac)
    assert not core["triton"].marker.evaluate(windows)
    # numpy >= 2.3 needs Python 3.11: a floor of 3.10 would let pip pick a resolution that cannot exist.
    python = SpecifierSet(table["requires-python"])
    assert core["numpy"].specifier.contains("2.3.0") and "3.11" in python and "3.10" not in python
    lab = {Requirement(text).name for text in table["optional-dependencies"]["lab"]}
    assert {"pyyaml", "tqdm", "matplotlib"} <= lab
    module, function = table["scripts"]["mos"].split(":")
    assert callable(getattr(importlib.import_module(module), function))
    hints = [(path, hint) for path in sorted((ROOT / "mos").rglob("*.py"))
             for hint in re.findall(r"pip install '([^'\[]+)\[(\w+)\]'", path.read_text())]
    assert hints, "no install hint found: the pattern is stale"
    for path, (name, extra) in hints:
        assert name == table["name"] and extra in table["optional-dependencies"], (path, name, extra)


@pytest.mark.slow
def test_a_wheel_ships_the_configs_and_the_sample_log_and_the_installed_package_finds_them(tmp_path):
    env = {**os.environ, "MOS_BUILD_CUDA": "0"}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(ROOT)], check=True, env=env, timeout=300, cwd=tmp_path)
    wheel, = (tmp_path / "dist").glob("mixture_of_sequence-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(path.name for path in (ROOT / "configs").glob("*.yaml"))
    assert sorted(name.split("/")[-1] for name in names if name.startswith("mos/lab/configs/")) == shipped
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, timeout=300)
    # From a directory without configs/, with the installed copy first on the path.
    env["PYTHONPATH"] = str(site)
    for given in ("default", "configs/profile.yaml"):
        done = subprocess.run([sys.executable, "-m", "mos", "train", "--config", given, "--print-config"],
                              capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
        assert done.returncode == 0, done.stderr
    check = subprocess.run([sys.executable, "-c", "import mos.lab.config_io as c; print(c.shipped_configs())"],
                           capture_output=True, text=True, env=env, cwd=tmp_path, check=True)
    assert str(site / "mos" / "lab" / "configs") in check.stdout
    # The sample log ships and `--data sample` names the installed copy.
    assert "mos/lab/data/sample_log.csv" in names
    done = subprocess.run([sys.executable, "-m", "mos", "train", "--data", "sample", "--print-config"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0 and "source: sample" in done.stdout, done.stderr
    check = subprocess.run([sys.executable, "-c", "from mos.lab.data.config import DataConfig; "
                            "print(DataConfig(source='sample').log_path)"],
                           capture_output=True, text=True, env=env, cwd=tmp_path, check=True)
    assert check.stdout.strip() == str(site / "mos" / "lab" / "data" / "sample_log.csv")
    done = subprocess.run([sys.executable, "-m", "mos", "train", "--config", "nonesuch", "--print-config"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    shipped = ", ".join(sorted(path.stem for path in (ROOT / "configs").glob("*.yaml")))
    assert done.returncode == 2 and f"shipped config ({shipped})" in done.stderr


@pytest.mark.slow
def test_the_triton_interpreter_deprecation_warning_alone_is_filtered(tmp_path):
    filters = project()["tool"]["pytest"]["ini_options"]["filterwarnings"]
    assert len(filters) == 1 and re.fullmatch(r"ignore:Conversion of an array.*:DeprecationWarning:triton\.\S+", filters[0])
    # An interpreted kernel test warns without the filter (here overridden by -W) and not with it.
    test = "tests/ops/test_session_pool_route.py::test_session_pool_empty_sessions_are_zero"
    outputs = []
    for extra in ([], ["-W", "default::DeprecationWarning"]):
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "--benchmark-disable", "-k",
                               "triton", *extra, test], capture_output=True, text=True, cwd=ROOT, timeout=600,
                              env={**os.environ, "TRITON_INTERPRET": "1"})
        assert done.returncode == 0 and " passed" in done.stdout, done.stdout[-2000:]
        outputs.append(done.stdout)
    assert "warning" not in outputs[0] and "Conversion of an array with ndim > 0 to a scalar" in outputs[1]
