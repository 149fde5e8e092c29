"""Make torchvision's pure-Python parts importable when its compiled ops cannot load.

The only torchvision built for torch 2.13.0 on the package index is a CUDA build. On a
CPU-only torch its `_C` extension fails to load, and `import torchvision` then dies in
`_meta_registrations` ("operator torchvision::nms does not exist"), taking `lpips` and
some image processors with it. This module is installed into the virtualenv by
`cluster/env/install.sh` (with a .pth line that imports it at start-up). It only puts a
finder on `sys.meta_path`: nothing is imported until the first `import torchvision`.
Then it tries torchvision's own `_C`; only if that raises OSError does it define the two
op schemas that torchvision registers fake kernels for. Where torchvision works, the
load succeeds and nothing else happens. Model code never sees any of this.
"""

import sys

_LIBRARY = None  # keeps the schema definitions alive for the life of the process


def _define_missing_ops() -> None:
    global _LIBRARY
    import glob
    import importlib.util
    import os

    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    libs = glob.glob(os.path.join(spec.submodule_search_locations[0], "_C*.so"))
    try:
        for lib in libs:
            torch.ops.load_library(lib)
        return
    except OSError:
        pass
    _LIBRARY = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        _LIBRARY.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


class _TorchvisionFinder:
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            _define_missing_ops()
        return None  # the regular finders do the import


sys.meta_path.insert(0, _TorchvisionFinder())
