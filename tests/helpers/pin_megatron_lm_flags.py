"""Pin Megatron-LM's command-line flags (pretrain_gpt and tools/preprocess_data.py) as JSON.

Run inside a Megatron-LM checkout (core_v0.16.1) with megatron-core's dependencies installed:
    PYTHONPATH=. python /path/to/pin_megatron_flags.py > megatron_lm_flags.json
"""
import argparse, importlib.abc, importlib.machinery, json, subprocess, sys
from unittest import mock

class _Stub(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    names = ("megatron.core.transformer.custom_layers.batch_invariant_kernels",)  # needs triton
    def find_spec(self, name, path, target=None):
        return importlib.machinery.ModuleSpec(name, self) if name in self.names else None
    def create_module(self, spec):
        return mock.MagicMock(name=spec.name)
    def exec_module(self, m):
        pass

def describe(parser):
    groups = {}
    for g in parser._action_groups:
        for a in g._group_actions:
            groups[id(a)] = g.title
    out = []
    for a in parser._actions:
        if not a.option_strings or a.dest == "help":
            continue
        kind = type(a).__name__.lstrip("_").replace("Action", "").lower() or "store"
        nargs = a.nargs if a.nargs is not None else (0 if kind in ("storetrue", "storefalse", "storeconst", "count", "appendconst") else None)
        default = a.default if isinstance(a.default, (type(None), bool, int, float, str)) else repr(a.default)
        out.append({"flags": a.option_strings, "dest": a.dest, "group": groups.get(id(a)), "kind": kind,
                    "nargs": nargs, "default": default,
                    "choices": [str(c) for c in a.choices] if a.choices is not None else None,
                    "help": " ".join((a.help or "").split())[:160]})
    return out

def preprocess_parser():
    import runpy
    captured = {}
    def grab(self, *a, **k):
        captured["p"] = self
        raise SystemExit(0)
    with mock.patch.object(argparse.ArgumentParser, "parse_args", grab):
        sys.argv = ["preprocess_data.py"]
        try:
            runpy.run_path("tools/preprocess_data.py", run_name="not_main")["get_args"]()
        except SystemExit:
            pass
    return captured["p"]

sys.meta_path.insert(0, _Stub())
from megatron.training.arguments import add_megatron_arguments
p = argparse.ArgumentParser(allow_abbrev=False)
add_megatron_arguments(p)
ref = subprocess.run(["git", "describe", "--tags"], capture_output=True, text=True).stdout.strip()
json.dump({"megatron_lm": ref, "source": "megatron/training/arguments.py add_megatron_arguments; tools/preprocess_data.py get_args",
           "pretrain_gpt": describe(p), "preprocess_data": describe(preprocess_parser())}, sys.stdout, indent=0)
