"""Builds torch_mp: libtorch_mp (CMake, the same build C++ users run) installed into the package,
then the small Python module torch_mp._C (torch.utils.cpp_extension) on top of it.

Install with `pip install --no-build-isolation .` so the build uses the torch already installed.
Extra CMake arguments come from the CMAKE_ARGS environment variable (for instance
CMAKE_ARGS="-DTORCH_MP_GLOO_INCLUDE_DIR=" builds without Gloo's headers even where they are installed).
"""
import hashlib
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = Path(__file__).parent.resolve()


def json_hint() -> list:
    """nlohmann/json's headers from PyPI (the nlohmann-json package) where it is installed: CMake
    looks there first, then in the system's folders (Debian: nlohmann-json3-dev)."""
    spec = importlib.util.find_spec("nlohmann_json")
    if spec is None or spec.origin is None:
        return []
    return [f"-DTORCH_MP_JSON_HINT={Path(spec.origin).parent / 'include'}"]


class BuildWithLibrary(BuildExtension):
    """Runs the CMake build of libtorch_mp into the package folder before building torch_mp._C."""

    def run(self):
        package_dir = Path(self.get_ext_fullpath("torch_mp._C")).parent
        # One CMake build folder per torch installation, so no two torches share a CMake cache.
        where = hashlib.sha256(torch.__file__.encode()).hexdigest()[:8]
        build_dir = ROOT / "build" / f"cmake-torch-{torch.__version__}-{where}"
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        # cmake and ninja from PyPI live beside this python, on PATH only in an activated venv.
        os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        subprocess.check_call([
            "cmake", "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DCMAKE_INSTALL_PREFIX={package_dir}",
            *json_hint(),
            *shlex.split(os.environ.get("CMAKE_ARGS", "")),
        ])
        subprocess.check_call(["cmake", "--build", str(build_dir), "-j", jobs])
        subprocess.check_call(["cmake", "--install", str(build_dir)])
        # CMake decides whether the CUDA side is built (a CUDA build of torch and a CUDA toolkit):
        # torch_mp._C is compiled the same way.
        cache = (build_dir / "CMakeCache.txt").read_text()
        with_cuda = re.search(r"^TORCH_MP_BUILT_WITH_CUDA:INTERNAL=ON$", cache, re.MULTILINE) is not None
        for extension in self.extensions:
            extension.library_dirs.append(str(package_dir / "lib"))
            if with_cuda:
                extension.define_macros.append(("TORCH_MP_WITH_CUDA", None))
        super().run()


setup(
    name="torch_mp",
    version="0.1.0",
    description="Model parallelism for PyTorch with a C++ core",
    packages=find_packages(include=["torch_mp", "torch_mp.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.6", "safetensors>=0.4"],
    extras_require={"plot": ["matplotlib"]},
    ext_modules=[
        CppExtension(
            "torch_mp._C",
            ["csrc/python/module.cpp"],
            include_dirs=[str(ROOT / "csrc" / "include"), str(ROOT / "csrc")],
            libraries=["torch_mp"],
            extra_link_args=["-Wl,-rpath,$ORIGIN/lib"],
        )
    ],
    cmdclass={"build_ext": BuildWithLibrary},
    zip_safe=False,
)
