"""resflows.layers stands on its own: importing it loads no other resflows module (data flows
scripts -> training -> model -> layers, never back), and the package's lazy top-level names resolve."""
import subprocess
import sys

import resflows


def _modules_after(statement: str) -> set:
    code = f"import sys; {statement}; print('\\n'.join(m for m in sys.modules if m.startswith('resflows')))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return set(out.split())


def test_importing_layers_loads_only_layers():
    mods = _modules_after("import resflows.layers")
    outside = {m for m in mods if m not in ("resflows", "resflows.layers") and not m.startswith("resflows.layers.")}
    assert not outside, sorted(outside)
    assert {"resflows.layers.iresblock", "resflows.layers.lipschitz", "resflows.layers.fc"} <= mods


def test_importing_the_package_loads_nothing_else():
    assert _modules_after("import resflows") == {"resflows"}


def test_lazy_top_level_names_resolve():
    from resflows.checkpoint import load_model
    from resflows.model import ResidualFlow

    assert resflows.ResidualFlow is ResidualFlow
    assert resflows.load_model is load_model
    for name in resflows.__all__:
        assert getattr(resflows, name) is not None
    assert set(resflows.__all__) <= set(dir(resflows))

