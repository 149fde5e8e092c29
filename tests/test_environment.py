"""The installed environment: CPU torch only, and torchvision's Python side importable."""

import importlib.metadata
import subprocess
import sys


def _python(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def test_no_cuda_packages_installed():
    import torch

    names = {d.metadata["Name"].lower() for d in importlib.metadata.distributions()}
    if not torch.cuda.is_available():
        assert not [n for n in names if n.startswith("nvidia-") or n == "triton"]
        assert torch.__version__.startswith("2.13.0")


def test_torchvision_hook_costs_nothing_at_startup():
    # the hook is installed, but torch is not imported until torchvision is
    assert (
        _python("import sys; print('torch' in sys.modules, '_unilip_torchvision_compat' in sys.modules)")
        == "False True"
    )


def test_torchvision_and_lpips_import():
    out = _python(
        "import torch, torchvision, lpips\n"
        "m = lpips.LPIPS(pretrained=True, net='alex', pnet_rand=True, verbose=False)\n"
        "x = torch.rand(1, 3, 64, 64) * 2 - 1\n"
        "print(float(m(x, x)), float(m(x, -x)) > 0, hasattr(torch.ops.torchvision, 'nms'))"
    )
    same, differs, nms = out.split()
    assert abs(float(same)) < 1e-6 and differs == "True" and nms == "True"
