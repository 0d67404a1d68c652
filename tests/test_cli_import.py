"""`--import`: runs whose specs use classes defined outside fdet open from the command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from fdet import specs

PLUGIN = '''
import attrs
import fdet
from fdet import specs


@attrs.frozen(kw_only=True)
class HalvingDecay(specs.Decay):
    """Half the learning rate for the second half of the run."""

    at: float = 0.5


@fdet.register(HalvingDecay)
def build_halving(spec):
    return lambda iteration, total: 0.5 if iteration >= spec.at * total else 1.0
'''


def run_fdet(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fdet", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_import_makes_a_spec_class_of_ones_own_known(tmp_path: Path) -> None:
    (tmp_path / "my_plugin.py").write_text(PLUGIN)
    exp = specs.to_dict(specs.load(Path(__file__).parents[1] / "specs/shapes/retinanet_r18_fpn.py"))
    exp["spec"]["schedule"]["decay"] = {"type": "HalvingDecay", "at": 0.75}
    (tmp_path / "exp.json").write_text(json.dumps(exp))

    unknown = run_fdet("spec", "exp.json", cwd=tmp_path)
    assert unknown.returncode == 2
    assert 'schedule.decay.type: unknown type "HalvingDecay"' in unknown.stderr
    assert "--import MODULE" in unknown.stderr

    for plugin in ("my_plugin", "my_plugin.py"):  # a module name, or a file
        known = run_fdet("spec", "exp.json", "--import", plugin, cwd=tmp_path)
        assert known.returncode == 0, known.stderr
        assert "decay: HalvingDecay" in known.stdout and "at: 0.75" in known.stdout

    missing = run_fdet("spec", "exp.json", "--import", "no_such_module", cwd=tmp_path)
    assert missing.returncode != 0
    assert "--import no_such_module" in missing.stderr
