import pytest


def pytest_collection_modifyitems(config, items):
    """Every test whose name (parameters included) mentions ``cpp`` gets the ``cpp`` marker; tests marked
    ``cuda`` are skipped where CUDA is not available."""
    import torch
    no_cuda = pytest.mark.skip(reason='needs a CUDA GPU')
    for item in items:
        if 'cpp' in item.name and item.get_closest_marker('cpp') is None:
            item.add_marker(pytest.mark.cpp)
        if item.get_closest_marker('cuda') is not None and not torch.cuda.is_available():
            item.add_marker(no_cuda)


@pytest.fixture(scope='session', autouse=True)
def _cpp_kernels_build_once():
    """Build the C++ involution kernels (rednet.ops.cpp) once, before any test or subprocess needs them, so
    parallel subprocesses don't each start a build. A failed build (no C++ compiler) is not an error here: only
    the tests marked ``cpp`` fail (below); every other test runs on the pure-PyTorch kernels."""
    from rednet.ops import cpp
    cpp.available()


@pytest.fixture(autouse=True)
def _cpp_kernels_built(request):
    """Tests marked ``cpp`` fail, not skip, when the C++ kernels did not build: the CPU's ``auto`` backend is
    ``cpp``, and a broken build must be seen."""
    if request.node.get_closest_marker('cpp') is not None:
        from rednet.ops import cpp
        assert cpp.available(), f'the C++ involution kernels did not build: {cpp.load_error()}'
