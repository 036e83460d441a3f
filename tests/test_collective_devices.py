"""Every tensor the package hands to a torch.distributed collective is made by the device layer.

NCCL and HCCL only accept tensors on the accelerator; gloo accepts CPU tensors. So a `torch.tensor([...])`
handed to `all_reduce` passes every CPU test and crashes (or hangs) on the first GPU iteration. A runtime check
on a CPU-only machine cannot tell the two apart (the platform device *is* the CPU there), and it would only see
the code paths a test happens to run. This check is static instead: it reads every module of the package and
requires that each tensor argument of a tensor collective (all_reduce, broadcast, send/recv, all_gather, ...)
is traceable, inside its function, to one of `mindspeed_llm.platform.COLLECTIVE_HELPERS` (`device_tensor`,
`device_empty`, `to_comm_device`), which place it on the device the process group communicates on. A new
collective written with a bare factory, a function parameter or anything else it cannot trace fails here, on
CPU, naming the file and line; the fix is to wrap the tensor in a helper (`to_comm_device(t)` costs nothing when
`t` is already on the device). The checker itself is tested on small sources that must fail.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Optional

import pytest

from mindspeed_llm.platform import COLLECTIVE_HELPERS

ROOT = Path(__file__).resolve().parents[1]

# torch.distributed function -> its tensor arguments as (position, keyword, is a list of tensors).
TENSOR_ARGS: dict[str, list[tuple[int, str, bool]]] = {
    **{name: [(0, "tensor", False)] for name in ("all_reduce", "broadcast", "reduce", "send", "recv", "isend",
                                                  "irecv")},
    "all_gather": [(0, "tensor_list", True), (1, "tensor", False)],
    "all_gather_into_tensor": [(0, "output_tensor", False), (1, "input_tensor", False)],
    "reduce_scatter": [(0, "output", False), (1, "input_list", True)],
    "reduce_scatter_tensor": [(0, "output", False), (1, "input", False)],
    "gather": [(0, "tensor", False), (1, "gather_list", True)],
    "scatter": [(0, "tensor", False), (1, "scatter_list", True)],
    "all_to_all": [(0, "output_tensor_list", True), (1, "input_tensor_list", True)],
    "all_to_all_single": [(0, "output", False), (1, "input", False)],
}
# Methods that return a tensor on the same device as the one they are called on.
SAME_DEVICE_METHODS = {"contiguous", "view", "view_as", "reshape", "clone", "detach", "flatten", "narrow",
                       "squeeze", "unsqueeze", "__getitem__"}
# torch functions whose result lives on the device of their first argument.
SAME_DEVICE_FUNCTIONS = {"torch.empty_like", "torch.zeros_like", "torch.ones_like", "torch.full_like"}


def _dotted(node: ast.AST) -> Optional[str]:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


class _Module:
    """Names under which one module reaches torch.distributed and the platform helpers."""

    def __init__(self, tree: ast.Module) -> None:
        self.dist_aliases = {"torch.distributed"}
        self.direct: dict[str, str] = {}          # local name -> torch.distributed function
        self.helpers: set[str] = set()            # local names bound to platform helpers
        self.platform_aliases: set[str] = {"mindspeed_llm.platform"}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name == "torch.distributed" and a.asname:
                        self.dist_aliases.add(a.asname)
                    if a.name == "mindspeed_llm.platform" and a.asname:
                        self.platform_aliases.add(a.asname)
            elif isinstance(node, ast.ImportFrom):
                for a in node.names:
                    local = a.asname or a.name
                    if node.module == "torch" and a.name == "distributed":
                        self.dist_aliases.add(local)
                    elif node.module == "torch.distributed" and a.name in TENSOR_ARGS:
                        self.direct[local] = a.name
                    elif node.module == "mindspeed_llm.platform" and a.name in COLLECTIVE_HELPERS:
                        self.helpers.add(local)
                    elif node.module == "mindspeed_llm" and a.name == "platform":
                        self.platform_aliases.add(local)

    def collective(self, call: ast.Call) -> Optional[str]:
        func = call.func
        if isinstance(func, ast.Name):
            return self.direct.get(func.id)
        if isinstance(func, ast.Attribute) and func.attr in TENSOR_ARGS and _dotted(func.value) in self.dist_aliases:
            return func.attr
        return None

    def is_helper(self, func: ast.AST) -> bool:
        if isinstance(func, ast.Name):
            return func.id in self.helpers
        return (isinstance(func, ast.Attribute) and func.attr in COLLECTIVE_HELPERS
                and _dotted(func.value) in self.platform_aliases)


def _binds(node: ast.AST, name: str) -> bool:
    """Whether `node` (a statement, searched without entering nested scopes) rebinds `name` anywhere."""
    nodes = [node, *_walk_scope(node)]
    for n in nodes:
        if isinstance(n, ast.Name) and n.id == name and isinstance(n.ctx, (ast.Store, ast.Del)):
            return True
        if isinstance(n, (ast.Global, ast.Nonlocal)) and name in n.names:
            return True
    return False


def _reaching_value(scope: ast.AST, use: ast.AST, name: str, parents: dict) -> Optional[ast.AST]:
    """The value of the plain assignment to `name` that every path from the start of `scope` to `use` passes
    last (`x = f(x)` right before the call, say), or None when straight-line reasoning cannot tell."""
    stmt = use
    while parents.get(stmt) is not None and stmt is not scope:
        parent = parents[stmt]
        if isinstance(stmt, ast.stmt):
            for field in ("body", "orelse", "finalbody"):
                block = getattr(parent, field, None)
                if isinstance(block, list) and any(s is stmt for s in block):
                    if isinstance(parent, (ast.For, ast.AsyncFor, ast.While)) and any(
                            _binds(s, name) for s in parent.body + parent.orelse):
                        return None                   # a later statement of the loop reaches the next pass
                    for prev in reversed(block[:[i for i, s in enumerate(block) if s is stmt][0]]):
                        if isinstance(prev, ast.Assign) and len(prev.targets) == 1 and \
                                isinstance(prev.targets[0], ast.Name) and prev.targets[0].id == name:
                            return prev.value
                        if _binds(prev, name):
                            return None
        stmt = parent
    return None


def _assignments(scope: ast.AST, name: str) -> Optional[list[ast.AST]]:
    """Every value assigned to `name` in `scope`; None when it is also bound some other way (parameter, loop or
    with target, tuple unpacking, global) and so cannot be traced."""
    if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        a = scope.args
        if name in {x.arg for x in a.posonlyargs + a.args + a.kwonlyargs + [a.vararg, a.kwarg] if x}:
            return None
    values: list[ast.AST] = []
    for node in _walk_scope(scope):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name) and target.id == name:
                    values.append(node.value)
                elif any(isinstance(n, ast.Name) and n.id == name and isinstance(n.ctx, ast.Store)
                         for n in ast.walk(target)):
                    return None
        elif isinstance(node, (ast.AnnAssign, ast.NamedExpr)) and isinstance(node.target, ast.Name) \
                and node.target.id == name and node.value is not None:
            values.append(node.value)
        elif isinstance(node, (ast.For, ast.AsyncFor, ast.comprehension)) and \
                any(isinstance(n, ast.Name) and n.id == name for n in ast.walk(node.target)):
            return None
        elif isinstance(node, ast.withitem) and node.optional_vars is not None and \
                any(isinstance(n, ast.Name) and n.id == name for n in ast.walk(node.optional_vars)):
            return None
        elif isinstance(node, (ast.Global, ast.Nonlocal)) and name in node.names:
            return None
    return values or None


def _walk_scope(scope: ast.AST):
    """Nodes of `scope` without descending into nested functions or classes (their own scopes)."""
    todo = list(ast.iter_child_nodes(scope))
    while todo:
        node = todo.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            todo.extend(ast.iter_child_nodes(node))


def _on_device(expr: ast.AST, scope: ast.AST, mod: _Module, is_list: bool, use: ast.AST,
               seen: frozenset = frozenset()) -> bool:
    """Whether `expr`, evaluated at `use`, is traceable to a device-layer helper."""
    def rec(e: ast.AST, lst: bool) -> bool:
        return _on_device(e, scope, mod, lst, use, seen)

    if isinstance(expr, ast.Constant) and expr.value is None:
        return is_list                                   # gather/scatter lists are None off the root rank
    if isinstance(expr, ast.IfExp):
        return rec(expr.body, is_list) and rec(expr.orelse, is_list)
    if isinstance(expr, ast.Name):
        parents = {child: node for node in [scope, *_walk_scope(scope)] for child in ast.iter_child_nodes(node)}
        value = _reaching_value(scope, use, expr.id, parents)
        if value is not None:
            return _on_device(value, scope, mod, is_list, value, seen)
        if expr.id in seen:
            return True                                  # a cycle of assignments: the other ones decide
        values = _assignments(scope, expr.id)
        return values is not None and all(_on_device(v, scope, mod, is_list, v, seen | {expr.id})
                                          for v in values)
    if is_list:
        if isinstance(expr, (ast.List, ast.Tuple)):
            return all(rec(e, False) for e in expr.elts)
        if isinstance(expr, ast.ListComp):
            return rec(expr.elt, False)
        if isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.Mult):
            return rec(expr.left, True)
        return False
    if isinstance(expr, ast.Call):
        if mod.is_helper(expr.func):
            return True
        if isinstance(expr.func, ast.Attribute) and expr.func.attr in SAME_DEVICE_METHODS:
            return rec(expr.func.value, False)
        if _dotted(expr.func) in SAME_DEVICE_FUNCTIONS and expr.args:
            return rec(expr.args[0], False)
        return False
    if isinstance(expr, ast.Subscript):
        return rec(expr.value, False)
    return False


def _argument(call: ast.Call, pos: int, keyword: str) -> Optional[ast.AST]:
    if len(call.args) > pos and not any(isinstance(a, ast.Starred) for a in call.args[:pos + 1]):
        return call.args[pos]
    return next((k.value for k in call.keywords if k.arg == keyword), None)


def untraced_collective_tensors(source: str, filename: str = "<source>") -> list[str]:
    """`file:line: dist.fn(arg)` for every tensor argument of a collective not traceable to a helper."""
    tree = ast.parse(source, filename)
    mod = _Module(tree)
    problems: list[str] = []

    def visit(scope: ast.AST) -> None:
        for node in _walk_scope(scope):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
                visit(node)
            elif isinstance(node, ast.Call) and (fn := mod.collective(node)):
                for pos, keyword, is_list in TENSOR_ARGS[fn]:
                    arg = _argument(node, pos, keyword)
                    if arg is not None and not _on_device(arg, scope, mod, is_list, node):
                        problems.append(f"{filename}:{node.lineno}: {fn}({ast.unparse(arg)}) -- "
                                        f"make it with mindspeed_llm.platform.{'/'.join(COLLECTIVE_HELPERS)}")

    visit(tree)
    return problems


def _package_files() -> list[Path]:
    files = sorted((ROOT / "mindspeed_llm").rglob("*.py")) + sorted(ROOT.glob("*.py"))
    return files + sorted((ROOT / "tools").glob("*.py"))


def test_package_collectives_take_device_tensors():
    files = _package_files()
    assert len(files) > 20
    seen_collectives = 0
    problems: list[str] = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text)
        mod = _Module(tree)
        seen_collectives += sum(1 for n in ast.walk(tree) if isinstance(n, ast.Call) and mod.collective(n))
        problems += untraced_collective_tensors(text, str(path.relative_to(ROOT)))
    assert seen_collectives >= 8, "the checker no longer recognises the package's collectives"
    assert not problems, "tensors handed to collectives without the device layer:\n" + "\n".join(problems)


@pytest.mark.parametrize("source", [
    # the bug seen on a GPU: a host tensor into all_reduce
    "import torch\ndef f(x):\n    flag = torch.tensor([x])\n    torch.distributed.all_reduce(flag)\n",
    "import torch\nimport torch.distributed as dist\ndef f():\n    dist.broadcast(torch.zeros(2), 0)\n",
    # a tensor from the caller cannot be traced: wrap it in to_comm_device
    "from torch.distributed import all_reduce\ndef f(t):\n    all_reduce(t)\n",
    "import torch.distributed as dist\ndef f(t):\n    dist.send(t.contiguous(), dst=1)\n",
    # one good and one bad assignment
    "import torch, torch.distributed as dist\nfrom mindspeed_llm.platform import device_tensor\n"
    "def f(a):\n    v = device_tensor([0.0])\n    if a:\n        v = torch.ones(1)\n    dist.all_reduce(v)\n",
    # a helper of the same name not from the device layer
    "import torch.distributed as dist\ndef device_tensor(v):\n    return v\n"
    "def f():\n    dist.all_reduce(device_tensor([1]))\n",
    # lists of tensors
    "import torch, torch.distributed as dist\nfrom mindspeed_llm.platform import device_tensor\ndef f(n):\n"
    "    t = device_tensor([1])\n    out = [torch.zeros(1) for _ in range(n)]\n    dist.all_gather(out, t)\n",
    "import torch, torch.distributed as dist\nfrom mindspeed_llm.platform import device_tensor\ndef f(n, x):\n"
    "    t = device_tensor([1])\n    out = [torch.empty_like(x) for _ in range(n)]\n    dist.all_gather(out, t)\n",
    "import torch.distributed as dist\nfrom mindspeed_llm.platform import device_empty\ndef f(t):\n"
    "    dist.all_gather(tensor_list=[device_empty(1, None)], tensor=t)\n",
])
def test_checker_rejects_host_tensors(source):
    assert untraced_collective_tensors(source), source


@pytest.mark.parametrize("source", [
    "import torch\nfrom mindspeed_llm.platform import device_tensor\ndef f(x):\n"
    "    flag = device_tensor([x], torch.int64)\n    torch.distributed.all_reduce(flag)\n    return flag.item()\n",
    "import torch.distributed as dist\nfrom mindspeed_llm import platform\ndef f(t, g):\n"
    "    buf = platform.to_comm_device(t, g)\n    dist.broadcast(buf, src=0, group=g)\n"
    "    if buf is not t:\n        t.copy_(buf)\n",
    "import torch.distributed as dist\nfrom mindspeed_llm.platform import device_empty, to_comm_device\n"
    "def f(t, n):\n    out = [device_empty(t.shape, t.dtype) for _ in range(n)]\n"
    "    dist.all_gather(out, to_comm_device(t).contiguous())\n    dist.gather(to_comm_device(t), None, dst=0)\n",
    # *_like functions follow the device of their argument
    "import torch, torch.distributed as dist\nfrom mindspeed_llm.platform import to_comm_device\ndef f(x, g):\n"
    "    x = to_comm_device(x, g)\n    out = [torch.empty_like(x) for _ in range(2)]\n    dist.all_gather(out, x)\n",
    # object collectives carry no tensors of ours (they stage through the current device, bound at init)
    "import torch.distributed as dist\ndef f(x):\n    box = [x]\n    dist.broadcast_object_list(box, src=0)\n",
])
def test_checker_accepts_device_layer_tensors(source):
    assert untraced_collective_tensors(source) == []


@pytest.mark.parametrize("source, ok", [
    # the assignment right before the collective decides ...
    ("import torch, torch.distributed as dist\nfrom mindspeed_llm.platform import to_comm_device\ndef f(a, g):\n"
     "    if a:\n        p = torch.ones(2)\n    else:\n        p = torch.zeros(2)\n"
     "    p = to_comm_device(p, g)\n    dist.all_reduce(p, group=g)\n", True),
    # ... but not when a later statement of a loop rebinds it before the next pass
    ("import torch, torch.distributed as dist\nfrom mindspeed_llm.platform import device_tensor\ndef f(n):\n"
     "    v = device_tensor([0])\n    for _ in range(n):\n        dist.all_reduce(v)\n        v = torch.ones(1)\n",
     False),
    # a same-device method of a host tensor is still a host tensor
    ("import torch, torch.distributed as dist\ndef f():\n    x = torch.zeros(2)\n    x = x.contiguous()\n"
     "    dist.all_reduce(x)\n", False),
    # writing into an element does not rebind
    ("import torch, torch.distributed as dist\nfrom mindspeed_llm.platform import device_tensor\ndef f(y):\n"
     "    v = device_tensor([0.0])\n    if y:\n        v[0] = y\n    dist.all_reduce(v)\n", True),
])
def test_checker_follows_straight_line_assignments(source, ok):
    assert (untraced_collective_tensors(source) == []) is ok, source
