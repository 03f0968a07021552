"""The package's shape: no import cycles (deferred imports inside functions count too), the model a leaf,
and `import finetune` cheap (transformers' model code and PEFT load when first used, yet the Auto classes
and PEFT still know the project's classes)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "finetune"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> project modules it imports anywhere in its body (module level or inside functions)."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    origin = ".".join(base + ([node.module] if node.module else []))
                else:
                    origin = node.module or ""
                for alias in node.names:
                    sub = f"{origin}.{alias.name}"
                    targets.append(sub if sub in modules else origin)
            for t in targets:
                while t and t not in modules and "." in t:  # `import finetune.x.y` of a name inside a module
                    t = t.rpartition(".")[0]
                if t in modules and t != mod:
                    graph[mod].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_deferred_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    graph = import_graph()
    assert "finetune.modeling.model" in graph["finetune.training.graphs"]  # a module-level import is seen
    assert "finetune.training.seeded_dropout" in graph["finetune.training.graphs"]  # so is a deferred one


def test_no_import_cycles_in_the_package():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_model_is_a_leaf():
    """modeling/ imports nothing from the packages that assemble the model."""
    graph = import_graph()
    assemblers = ("finetune.training", "finetune.inference", "finetune.serve", "finetune.train")
    bad = sorted((m, t) for m, targets in graph.items() if m.startswith("finetune.modeling")
                 for t in targets if t.startswith(assemblers))
    assert not bad, bad


def _fresh(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=PACKAGE.parent, timeout=300).stdout


def test_import_finetune_loads_neither_model_code_nor_peft():
    out = _fresh("import sys, finetune, finetune.data, finetune.cli; import json; print(json.dumps("
                 "[m for m in ('transformers.modeling_utils', 'peft', 'finetune.modeling.model') if m in sys.modules]))")
    assert json.loads(out.strip().splitlines()[-1]) == []


def test_auto_classes_and_peft_know_the_project_after_a_bare_import(tiny_model_dir, tmp_path):
    """The loading contract (README), in a fresh process: `import finetune` and nothing else, then transformers' and
    PEFT's own entry points load a Qwen v1 dir and an adapter on it."""
    code = f"""
import finetune, torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from peft import AutoPeftModelForCausalLM, LoraConfig, get_peft_model
cfg = AutoConfig.from_pretrained({str(tiny_model_dir)!r})
model = AutoModelForCausalLM.from_pretrained({str(tiny_model_dir)!r})
tok = AutoTokenizer.from_pretrained({str(tiny_model_dir)!r})
peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["c_attn"], task_type="CAUSAL_LM"))
peft_model.save_pretrained({str(tmp_path / 'adapter')!r})
again = AutoPeftModelForCausalLM.from_pretrained({str(tmp_path / 'adapter')!r})
print(type(cfg).__name__, type(model).__name__, type(tok).__name__, type(again.base_model.model).__name__)
"""
    assert _fresh(code).split() == ["QWenConfig", "QWenLMHeadModel", "QWenTokenizer", "QWenLMHeadModel"]
