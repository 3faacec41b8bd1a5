"""Run one of timm's own scripts (``train.py``, ``validate.py``, ``benchmark.py``, ...) with the RedNet models
registered::

    python -m rednet.timm_scripts path/to/timm/benchmark.py --model rednet50 --bench inference
    python -m rednet.timm_scripts path/to/timm/validate.py /data/imagenet --model rednet50 --checkpoint rednet50.pth

timm's scripts create models by name through timm's registry, which knows the RedNets once ``rednet`` is
imported; this module imports it, then runs the script as ``__main__`` with the remaining arguments.
(timm's ``train.py`` can also do it itself: ``--device-modules rednet``.)
"""
import runpy
import sys

import rednet  # noqa: F401  (registers the RedNet models with timm)


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or not argv[0].endswith('.py'):
        sys.exit('usage: python -m rednet.timm_scripts path/to/timm/SCRIPT.py [script arguments ...]')
    sys.argv = argv
    runpy.run_path(argv[0], run_name='__main__')


if __name__ == '__main__':
    main()
