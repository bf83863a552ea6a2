"""No pickle anywhere: Celery speaks JSON only, weights load with weights_only, arrays as .npy."""

from __future__ import annotations

import ast
from pathlib import Path

from api import Services
from shared.settings import Settings

REPO = Path(__file__).resolve().parents[1]
SOURCES = [p for folder in ("api", "shared", "workers", "client", "scripts")
           for p in sorted((REPO / folder).rglob("*.py"))]


def _calls(tree: ast.AST, dotted: str):
    owner, name = dotted.split(".")
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == name and isinstance(node.func.value, ast.Name)
                and node.func.value.id == owner):
            yield node


def test_no_module_imports_pickle_or_its_relatives():
    banned = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not {n.split(".")[0] for n in names} & banned, (path, names)


def test_every_torch_load_is_weights_only_and_no_np_load_allows_pickle():
    loads = 0
    for path in SOURCES:
        tree = ast.parse(path.read_text(), str(path))
        for call in _calls(tree, "torch.load"):
            loads += 1
            kw = {k.arg: k.value for k in call.keywords}
            assert isinstance(kw.get("weights_only"), ast.Constant), path
            assert kw["weights_only"].value is True, path
        for call in _calls(tree, "np.load"):
            kw = {k.arg: k.value for k in call.keywords}
            assert "allow_pickle" not in kw or kw["allow_pickle"].value is False, path
    assert loads >= 1


def test_celery_on_both_sides_accepts_json_only(redis_url):
    from workers.celery_app import app as worker_app

    api_queue = Services(Settings(redis_url=redis_url)).queue
    for conf in (worker_app.conf, api_queue.conf):
        assert conf.task_serializer == "json"
        assert list(conf.accept_content) == ["json"]
    assert worker_app.conf.result_serializer == "json"
