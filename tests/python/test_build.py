"""The build as a new user meets it: CMake's configure against a CUDA build of torch on a machine
without the CUDA toolkit, nlohmann/json's headers missing, and the Makefile's install stamp (make -n:
nothing is built). The whole CPU build with PyPI's headers and no system ones is `make test-cpu-smoke`."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
LEFT_OUT = "torch_mp: the installed torch is a CUDA build but no CUDA toolkit was found"

needs_cmake = pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("ninja") is None,
                                 reason="needs cmake and ninja")
needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


def without_toolkit() -> dict:
    """The environment of a machine without the CUDA toolkit: no nvcc on PATH, CUDA_HOME naming nowhere."""
    env = {key: value for key, value in os.environ.items() if key not in ("CUDA_PATH", "CUDA_BIN_PATH")}
    env["CUDA_HOME"] = "/nonexistent/cuda"
    env["PATH"] = os.pathsep.join(folder for folder in env["PATH"].split(os.pathsep)
                                  if not os.path.exists(os.path.join(folder, "nvcc")))
    return env


def configure(build_dir: Path, *options: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
                           f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", *options],
                          env=env, capture_output=True, text=True, timeout=300)


def cache_entry(build_dir: Path, name: str) -> str:
    for line in (build_dir / "CMakeCache.txt").read_text().splitlines():
        if line.startswith(name + ":"):
            return line.split("=", 1)[1]
    raise AssertionError(f"{name} not in {build_dir / 'CMakeCache.txt'}")


@needs_cmake
@pytest.mark.skipif(torch.version.cuda is None, reason="needs a CUDA build of torch (the default Linux wheel)")
def test_cuda_torch_without_toolkit_builds_the_cpu_side_and_says_so(tmp_path):
    # torch's own CMake config stopped here: "Your installed Caffe2 version uses CUDA but I cannot
    # find the CUDA libraries".
    result = configure(tmp_path, env=without_toolkit())
    assert result.returncode == 0, result.stdout + result.stderr
    output = result.stdout + result.stderr
    assert output.count(LEFT_OUT) == 1, output
    assert cache_entry(tmp_path, "TORCH_MP_BUILT_WITH_CUDA") == "OFF"


@needs_cmake
@pytest.mark.skipif(torch.version.cuda is None, reason="needs a CUDA build of torch (the default Linux wheel)")
def test_cuda_side_asked_for_without_toolkit_is_an_error_before_compiling(tmp_path):
    result = configure(tmp_path, "-DTORCH_MP_WITH_CUDA=ON", env=without_toolkit())
    assert result.returncode != 0
    assert "TORCH_MP_WITH_CUDA=ON needs a CUDA build of torch and the CUDA toolkit" in result.stderr
    assert not (tmp_path / "build.ninja").exists()


@needs_cmake
def test_json_headers_missing_is_an_error_naming_the_pypi_package(tmp_path):
    # /usr/include ignored: a machine without Debian's nlohmann-json3-dev; no hint: nor PyPI's.
    result = configure(tmp_path, "-DCMAKE_IGNORE_PATH=/usr/include", "-DTORCH_MP_JSON_HINT=", env=without_toolkit())
    assert result.returncode != 0
    assert "torch_mp needs nlohmann/json 3.9 or newer" in result.stderr
    assert "pip install nlohmann-json" in " ".join(result.stderr.split())


@needs_cmake
def test_json_headers_from_a_pypi_style_folder(tmp_path):
    # The nlohmann-json wheel's layout: <site-packages>/nlohmann_json/include/nlohmann/json.hpp.
    include = tmp_path / "nlohmann_json" / "include"
    (include / "nlohmann").mkdir(parents=True)
    (include / "nlohmann" / "json.hpp").write_text(
        "#define NLOHMANN_JSON_VERSION_MAJOR 3   // NOLINT\n#define NLOHMANN_JSON_VERSION_MINOR 12  // NOLINT\n")
    result = configure(tmp_path / "build", "-DCMAKE_IGNORE_PATH=/usr/include", f"-DTORCH_MP_JSON_HINT={include}",
                       env=without_toolkit())
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"torch_mp: nlohmann/json 3.12 from {include}" in result.stdout
    assert cache_entry(tmp_path / "build", "TORCH_MP_JSON_INCLUDE_DIR") == str(include)


def make_env() -> dict:
    """This process's environment less what a make running these tests passes to the makes it
    starts (`make test` runs its parts with `-o install`)."""
    return {key: value for key, value in os.environ.items()
            if key not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")}


def make_dry_run(cache: Path, *targets: str) -> str:
    """What `make -n` would run, with the venvs in ``cache``."""
    result = subprocess.run(["make", "-n", f"CACHE_DIR={cache}", *targets], cwd=ROOT, env=make_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def make_variable(cache: Path, name: str) -> str:
    return subprocess.run(["make", "-s", f"CACHE_DIR={cache}", "--eval", "print-%: ; @echo $($*)", f"print-{name}"],
                          cwd=ROOT, env=make_env(), capture_output=True, text=True, check=True,
                          timeout=120).stdout.strip()


@needs_make
@pytest.mark.skipif(not list((ROOT / "torch_mp").glob("_C*.so")), reason="needs the built module in the clone")
def test_make_installs_again_only_when_its_inputs_changed(tmp_path):
    venv = Path(make_variable(tmp_path, "VENV"))
    stamp = Path(make_variable(tmp_path, "INSTALL_STAMP"))
    venv.mkdir(parents=True)
    (venv / ".ready").touch()
    assert "pip install --quiet --no-build-isolation --no-deps -e ." in make_dry_run(tmp_path, "install")
    stamp.touch()  # what the install's last line does
    for target in ("install", "demo"):
        assert "pip install" not in make_dry_run(tmp_path, target), target
    assert "split_demo.py" in make_dry_run(tmp_path, "demo")
    os.utime(stamp, (0, 0))  # older than setup.py and csrc/: an input changed since
    assert "pip install" in make_dry_run(tmp_path, "install")


@needs_make
def test_cpu_venv_made_by_the_same_python_under_make_test(tmp_path):
    # `make test` runs its parts in makes of their own, whose PATH starts with the CUDA venv's bin/:
    # a python3 there must not make the CPU venv.
    python = make_variable(tmp_path, "PYTHON")
    venv = Path(make_variable(tmp_path, "VENV"))
    (venv / "bin").mkdir(parents=True)
    (venv / ".ready").touch()
    (venv / "bin" / "python3").symlink_to(sys.executable)
    cpu_venv = make_variable(tmp_path, "CPU_VENV")
    made = [line for line in make_dry_run(tmp_path, "test-part/test-cpu-smoke").splitlines()
            if "/venv-cpu-" in line and " -m venv " in line]
    assert made, "make -n test-part/test-cpu-smoke does not make the CPU venv"
    assert all(f"{python} -m venv {cpu_venv}" in line for line in made), (python, made)
