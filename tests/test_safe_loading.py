"""Safe loading: nothing a user hands in or a run writes is unpickled.

Everything icons reads is safetensors, ``.npy`` with ``allow_pickle=False`` (NumPy's default), or
JSON; where a torch file cannot be avoided (LLaVA's stage-1 ``mm_projector.bin``) it is read with
``torch.load(..., weights_only=True)``. This test scans ``src/`` (the Python syntax tree, so
comments and strings do not count) and fails on any way back to pickle.
"""
import ast
import textwrap
from pathlib import Path

import numpy as np
import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    if isinstance(node, ast.Name):
        return node.id
    return "?"


def unsafe_loads(source: str, filename: str = "<src>") -> list[str]:
    """Every unpickling site in ``source``: ``file:line: what``."""
    found = []
    torch_load_names = {"torch.load"}  # also `from torch import load [as x]`
    tree = ast.parse(source, filename)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "torch":
            torch_load_names |= {a.asname or a.name for a in node.names if a.name == "load"}
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_MODULES:
            found.append(f"{where}: from {node.module} import ...")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            kw = {k.arg: k.value for k in node.keywords}
            if name in torch_load_names and not _is_true(kw.get("weights_only")):
                found.append(f"{where}: {name}(...) without weights_only=True")
            if "allow_pickle" in kw and not (isinstance(kw["allow_pickle"], ast.Constant)
                                            and kw["allow_pickle"].value is False):
                found.append(f"{where}: {name}(..., allow_pickle=...) not False")
            if "weights_only" in kw and not _is_true(kw["weights_only"]):
                found.append(f"{where}: {name}(..., weights_only=...) not True")
            if name.endswith(("read_pickle", "to_pickle")) or name.split(".")[0] in PICKLE_MODULES:
                found.append(f"{where}: {name}(...)")
    return found


def test_no_unpickling_anywhere_in_src():
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 20
    found = [hit for f in files for hit in unsafe_loads(f.read_text(), str(f.relative_to(SRC.parent)))]
    assert not found, "unsafe loading in src:\n" + "\n".join(found)


def test_the_one_torch_file_is_read_weights_only():
    """LLaVA's mm_projector.bin is the only torch file icons reads; it goes through weights_only."""
    hits = [(f, line) for f in sorted(SRC.rglob("*.py")) for line in f.read_text().splitlines()
            if "torch.load(" in line and not line.lstrip().startswith("#")]
    assert [f.name for f, _ in hits] == ["llava15.py"] and "weights_only=True" in hits[0][1]


@pytest.mark.parametrize("snippet", [
    "import torch\nx = torch.load(path)",
    "import torch\nx = torch.load(path, map_location='cpu', weights_only=False)",
    "from torch import load\nx = load(path)",
    "from torch import load as tl\nx = tl(path)",
    "import numpy as np\nx = np.load(path, allow_pickle=True)",
    "import numpy as np\nflag = True\nx = np.load(path, allow_pickle=flag)",
    "import pickle\nx = pickle.loads(b)",
    "from joblib import load",
    "import pandas as pd\nx = pd.read_pickle(p)",
    "from transformers import AutoModel\nm = AutoModel.from_pretrained(p, weights_only=False)",
])
def test_scanner_catches_each_unsafe_form(snippet):
    assert unsafe_loads(textwrap.dedent(snippet)), snippet


@pytest.mark.parametrize("snippet", [
    "import torch\nx = torch.load(path, map_location='cpu', weights_only=True)",
    "import numpy as np\nx = np.load(path)\ny = np.load(path, allow_pickle=False)",
    "from safetensors.torch import load_file\nx = load_file(p)",
    "# torch.load(path) in a comment\ns = 'pickle.loads'",
])
def test_scanner_accepts_safe_forms(snippet):
    assert unsafe_loads(snippet) == []


def test_stored_arrays_refuse_pickled_objects(tmp_path):
    """What the stages write with ``save_npy`` and read with ``np.load`` never holds objects."""
    from icons.io import save_npy

    with pytest.raises(ValueError):
        save_npy(tmp_path / "x.npy", np.array([{"a": 1}], dtype=object))
    np.save(tmp_path / "evil.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        np.load(tmp_path / "evil.npy")  # the default every reader in src relies on
