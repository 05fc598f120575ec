"""The one part of the package setup.cfg cannot declare: the optional C module of the HTTP/2 engine.

``mesh/proxy/codec/_nghttp2_pump.c`` (the session callbacks in C, docs/performance.md) needs a C compiler
and Python's headers, not libnghttp2's.  Where it cannot be built, the install goes on without it and the
engine's callbacks run in Python (cffi), which the tests also cover.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("mesh.proxy.codec._nghttp2_pump", ["mesh/proxy/codec/_nghttp2_pump.c"],
                             extra_compile_args=["-O2", "-Wall", "-Werror=implicit-function-declaration"],
                             optional=True)])
