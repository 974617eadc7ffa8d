"""Build of the native fast path of the policy decision (gateway/policy/_fastpath.cpp, a
CPython extension in C++ against Debian's libre2-dev). Everything else is in pyproject.toml.

Outside CI a failed build is a warning and the gateway runs the pure-Python engine (the
same decisions, slower; ``PolicySnapshot.engine`` says which one runs). With CI=true the
extension is required: a failed build fails the install.
"""

import os

from setuptools import Extension, setup

REQUIRED = os.environ.get("CI", "").lower() == "true"

setup(
    ext_modules=[
        Extension(
            "gateway.policy._fastpath",
            ["gateway/policy/_fastpath.cpp"],
            language="c++",
            libraries=["re2"],
            extra_compile_args=["-std=c++17", "-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers"],
            optional=not REQUIRED,
        )
    ],
)
