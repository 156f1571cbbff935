"""Build dinopatch._C (and dinopatch._C_cuda when CUDA is found) through CMake.

Follows pybind11's cmake_example: setuptools knows no sources, CMake builds the
extension straight into the package folder.  ``CMAKE_ARGS`` is passed through,
e.g. ``CMAKE_ARGS="-DDINOPATCH_CUDA=OFF" pip install -e .``.
"""
import os
import subprocess
import sys
from pathlib import Path

import pybind11

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class CMakeExtension(Extension):
    def __init__(self, name: str, sourcedir: str = "") -> None:
        super().__init__(name, sources=[])
        self.sourcedir = os.fspath(Path(sourcedir).resolve())


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        extdir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        cfg = "Debug" if int(os.environ.get("DEBUG", 0)) else "Release"
        cmake_args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}{os.sep}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DDINOPATCH_VERSION_INFO={self.distribution.get_version()}",
        ]
        if "CMAKE_ARGS" in os.environ:
            cmake_args += [a for a in os.environ["CMAKE_ARGS"].split(" ") if a]
        # Both cores here; CMake's default is one job.
        build_args = ["--config", cfg, "-j", str(os.cpu_count() or 2)]
        build_temp = Path(self.build_temp) / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cmake", ext.sourcedir, *cmake_args], cwd=build_temp, check=True)
        subprocess.run(["cmake", "--build", ".", *build_args], cwd=build_temp, check=True)


setup(
    ext_modules=[CMakeExtension("dinopatch._C")],
    cmdclass={"build_ext": CMakeBuild},
)
