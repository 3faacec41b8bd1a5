import pytest


@pytest.fixture(scope='session', autouse=True)
def _cpp_kernels_built():
    """Build the C++ involution kernels (rednet.ops.cpp) once, before any test (or subprocess) needs them: the
    CPU's ``auto`` backend is ``cpp``, and a build failure is a test failure, not a silent fallback."""
    from rednet.ops import cpp
    assert cpp.available(), f'the C++ involution kernels did not build: {cpp.load_error()}'
