"""The kernels under test run in Triton's CPU interpreter.

Triton decides between interpreting and compiling when a kernel is decorated, so the variable
must be set before the kernel modules are imported (conftest files load before test modules).
"""

import os

os.environ["TRITON_INTERPRET"] = "1"
