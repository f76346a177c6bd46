"""The package without its compiled extension (DSR_SKIP_BUILD=1): imports, explains, never falls back silently."""

import subprocess
import sys
import textwrap


def test_package_works_without_the_compiled_extension():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["dsr_kernels._C"] = None  # as if installed with DSR_SKIP_BUILD=1
        import torch, dsr_kernels
        from dsr_kernels import BackendUnavailable
        table = dsr_kernels.explain("norm_modulate", "cpu")
        assert "not importable" in table["cpu"] and "DSR_SKIP_BUILD" in table["cpu"], table
        assert table["reference"] == "available"
        x = torch.randn(2, 5, 8)
        res = dsr_kernels.norm_modulate(x, registers=torch.randn(2, 8), return_norms=True)  # auto: reference
        assert res.out.shape == (2, 7, 8) and res.norms.shape == (2, 7)
        try:
            dsr_kernels.norm_modulate(x, backend="cpu")
        except BackendUnavailable as exc:
            assert "not importable" in str(exc)
        else:
            raise AssertionError("explicit backend='cpu' ran without the extension")
        q = torch.randn(1, 2, 9, 16)
        assert dsr_kernels.attention(q, q, q).shape == q.shape
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
