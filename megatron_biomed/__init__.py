"""megatron_biomed: train BioMedLM-class GPT models from raw PubMed, Megatron-style."""
import importlib.abc
import sys

__version__ = "0.1.0"


class _NoWandbForMegatronCore(importlib.abc.MetaPathFinder):
    """megatron-core imports wandb, when it is installed, as it is itself imported, for inference
    logging we never do: half a second in every process that reads a dataset. Its import from
    megatron.core finds nothing (megatron-core then runs without it); ours (--wandb-project) is
    untouched."""

    def find_spec(self, name, path=None, target=None):
        if name != "wandb":
            return None
        frame = sys._getframe(1)
        while frame is not None:
            if frame.f_globals.get("__name__", "").startswith("megatron.core"):
                raise ModuleNotFoundError("wandb is not imported for megatron.core here", name=name)
            frame = frame.f_back
        return None


if not any(isinstance(f, _NoWandbForMegatronCore) for f in sys.meta_path):
    sys.meta_path.insert(0, _NoWandbForMegatronCore())
