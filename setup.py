"""Build of the optional native helper (src/graphdriver/_fastapply.c); the rest is pyproject.toml.

The extension is optional: when it cannot be compiled the install goes on and graphdriver uses its
pure-Python tar parser (also forced at run time with GRAPHDRIVER_NO_NATIVE=1).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "graphdriver._fastapply",
            ["src/graphdriver/_fastapply.c"],
            optional=True,
            extra_compile_args=["-O2", "-Wall"],
        ),
        Extension(
            "graphdriver._fastexport",
            ["src/graphdriver/_fastexport.c"],
            optional=True,
            extra_compile_args=["-O2", "-Wall"],
        ),
    ]
)
