"""Build of the optional native helpers (src/graphdriver/_fastapply.c for apply and tar-split,
src/graphdriver/_fastexport.c for export, src/graphdriver/_fastdigest.c for the diffID's sha256
thread, src/graphdriver/_fastzstd.c for zstd layers decoded by a native thread); the rest is
pyproject.toml.

They are optional: when one cannot be compiled the install goes on and graphdriver uses its
pure-Python code for that part (also forced at run time with GRAPHDRIVER_NO_NATIVE=1; see
src/graphdriver/archive/native.py).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            f"graphdriver.{name}",
            [f"src/graphdriver/{name}.c"],
            optional=True,
            extra_compile_args=["-O2", "-Wall"],
            depends=["src/graphdriver/_nativethread.h"],  # futexes and worker threads, shared
            # the worker threads; libcrypto (the one _hashlib loaded) and libzstd.so.1 are found at
            # run time
            libraries=["pthread", "dl"] if name in ("_fastdigest", "_fastzstd") else [],
        )
        for name in ("_fastapply", "_fastexport", "_fastdigest", "_fastzstd")
    ]
)
