"""Build dinopatch._C (and dinopatch._C_cuda when CUDA is wanted) through CMake.

Follows pybind11's cmake_example: setuptools knows no sources, CMake builds the
extension straight into the package folder.  ``CMAKE_ARGS`` is passed through:
``-DDINOPATCH_CUDA=ON`` forces the CUDA module (AUTO builds it only where a
CUDA compiler AND a GPU are present, since nvcc adds about 40 s to a build),
``-DDINOPATCH_CUDA=OFF`` skips it.  ``python setup.py build_ext --inplace``
builds into the source tree.
"""
import os
import shutil
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

    def copy_extensions_to_source(self) -> None:
        # setuptools copies only the declared _C; the same CMake run also
        # built _bench_C and maybe _C_cuda next to it (in-place and editable builds).
        super().copy_extensions_to_source()
        build_py = self.get_finalized_command("build_py")
        built = Path(self.build_lib) / "dinopatch"
        for extra in [*built.glob("_C_cuda*"), *built.glob("_bench_C*")]:
            shutil.copy2(extra, Path(build_py.get_package_dir("dinopatch")) / extra.name)


setup(
    # One CMake project builds _C, and _C_cuda when CUDA is found.
    ext_modules=[CMakeExtension("dinopatch._C")],
    cmdclass={"build_ext": CMakeBuild},
)
