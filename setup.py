"""The compiled modules: stream/join/_fastjoin.c (the join core's common path; docs/joiner.md
"Round 14") and stream/kafka/_records.c (the joiner's fetch path per record; "Round 21"); everything
else is in pyproject.toml. ``optional``: a machine without a C compiler still installs, and the
joiner runs their Python twins (tests/unit/test_fastjoin.py and test_lean_fetch.py then fail,
saying so)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("stream.join._fastjoin", ["stream/join/_fastjoin.c"], extra_compile_args=["-O2"], optional=True),
        Extension("stream.kafka._records", ["stream/kafka/_records.c"], extra_compile_args=["-O2"], optional=True),
    ]
)
