"""The one compiled module (stream/join/_fastjoin.c, the join core's common path; docs/joiner.md
"Round 14"); everything else is in pyproject.toml. ``optional``: a machine without a C compiler
still installs, and the joiner runs its pure Python core (``stream.join.fast.AVAILABLE`` is False;
tests/unit/test_fastjoin.py then fails, saying so)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("stream.join._fastjoin", ["stream/join/_fastjoin.c"], extra_compile_args=["-O2"], optional=True)
    ]
)
