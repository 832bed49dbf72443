"""Builds pyvf._C by running CMake (CMakeLists.txt is the one build description).

    pip install --no-build-isolation -e .     # development, .so lands in pyvf/
    pip install --no-build-isolation .        # regular install

`--no-build-isolation` builds against the torch already installed, instead of a fresh
one pip would download into an isolated environment. Environment variables:
    PYVF_CUDA_ARCHS   CUDA targets, default "8.0;9.0a"
    PYVF_NO_CUDA=1    skip the CUDA sources even when a toolkit and CUDA torch exist
    PYVF_BUILD_DIR    CMake build folder (default build/cmake), reused between builds
    MAX_JOBS          parallel compile jobs
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        build_dir = Path(os.environ.get("PYVF_BUILD_DIR", ROOT / "build" / "cmake")).resolve()
        build_dir.mkdir(parents=True, exist_ok=True)
        configure = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir),
            f"-DPython3_EXECUTABLE={sys.executable}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if shutil.which("ninja"):
            configure += ["-G", "Ninja"]
        if os.environ.get("PYVF_NO_CUDA", "") not in ("", "0"):
            configure.append("-DPYVF_NO_CUDA=ON")
        # A build folder configured with another generator cannot be reused.
        cache = build_dir / "CMakeCache.txt"
        if cache.exists() and ("Ninja" in configure) != ("CMAKE_GENERATOR:INTERNAL=Ninja" in cache.read_text()):
            shutil.rmtree(build_dir)
            build_dir.mkdir(parents=True)
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.run(configure, check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "--parallel", jobs], check=True)

        built = sorted(build_dir.glob("_C*.so")) + sorted(build_dir.glob("_C*.pyd"))
        if not built:
            raise RuntimeError(f"CMake finished but no _C module was found in {build_dir}")
        target = Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built[0], target)
        print(f"pyvf: installed {built[0].name} -> {target}")


setup(
    ext_modules=[CMakeExtension("pyvf._C")],
    cmdclass={"build_ext": CMakeBuild},
)
