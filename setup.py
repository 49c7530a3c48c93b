"""Builds fnlearn's oneDNN library for XLA:CPU: convolutions and batch normalisation as FFI
handlers (loaded by fnlearn/ops/onednn.py).

Optional: without a C++ compiler, oneDNN or XLA's FFI headers the install goes on, and
fnlearn's CPU convolutions and batch norms stay XLA's own. The headers come from the jaxlib and
onednn-devel-cpu-gomp wheels, the library from onednn-cpu-gomp (pyproject's
build-system requires), found through their installed file lists, so an isolated
build finds them too.
"""
import hashlib
import importlib.metadata
import os
import pathlib

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def _dir_of(distribution, filename):
    """The directory holding `filename` in an installed distribution, or None."""
    try:
        files = importlib.metadata.distribution(distribution).files or ()
    except importlib.metadata.PackageNotFoundError:
        return None
    path = next((f for f in files if str(f).endswith(filename)), None)
    return None if path is None else str(path.locate())[: -len(filename)]


FILES = sorted(p for p in pathlib.Path("fnlearn/ops/_onednn").iterdir() if p.suffix in (".cc", ".h"))


def source_hash(files):
    """The hash the library carries of the files it was built from (`FnlearnOnednnSource`)."""
    return hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()[:16]


class BuildFFI(build_ext):
    def run(self):
        # A library left by an earlier build must not outlive a build that fails or is skipped:
        # it would be packaged, or loaded, in place of this source's. Both copies go: the
        # build's own and, in place (editable installs), the source tree's.
        inplace = self.inplace
        targets = set()
        for self.inplace in {inplace, False}:
            targets.update(self.get_ext_fullpath(extension.name) for extension in self.extensions)
        self.inplace = inplace
        for target in targets:
            if os.path.exists(target):
                os.remove(target)
        super().run()

    def build_extensions(self):
        dirs = {"FFI headers (jaxlib)": _dir_of("jaxlib", "xla/ffi/api/ffi.h"),
                "oneDNN headers (onednn-devel-cpu-gomp)": _dir_of("onednn-devel-cpu-gomp", "oneapi/dnnl/dnnl.hpp"),
                "oneDNN (onednn-cpu-gomp)": _dir_of("onednn-cpu-gomp", "libdnnl.so")}
        missing = [name for name, found in dirs.items() if found is None]
        if missing:
            print(f"fnlearn: not building the oneDNN library, missing: {', '.join(missing)}")
            return
        extension = self.extensions[0]
        extension.include_dirs += list(dirs.values())[:2]
        extension.library_dirs.append(list(dirs.values())[2])
        super().build_extensions()

    def get_ext_filename(self, name):  # a plain shared library, loaded with ctypes
        return name.replace(".", "/") + ".so"


setup(
    ext_modules=[Extension("fnlearn.ops._onednn.libfnlearn_onednn", [str(p) for p in FILES if p.suffix == ".cc"],
                           depends=[str(p) for p in FILES if p.suffix == ".h"],
                           define_macros=[("FNLEARN_ONEDNN_SOURCE", f'"{source_hash(FILES)}"')],
                           libraries=["dnnl"], language="c++", optional=True,
                           extra_compile_args=["-std=c++17", "-O2", "-g0"])],
    cmdclass={"build_ext": BuildFFI},
)
