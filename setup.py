"""Build of the optional native helpers (src/graphdriver/_fastapply.c for apply and tar-split,
src/graphdriver/_fastexport.c for export, src/graphdriver/_fastdigest.c for the diffID's sha256
thread); the rest is pyproject.toml.

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
            # the digest's worker thread; libcrypto is the one _hashlib loaded, found at run time
            libraries=["pthread", "dl"] if name == "_fastdigest" else [],
        )
        for name in ("_fastapply", "_fastexport", "_fastdigest")
    ]
)
