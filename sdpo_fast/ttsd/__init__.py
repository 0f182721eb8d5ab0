"""Test-time self-distillation: SDPO on one problem until it is solved, against best-of-k sampling and
multi-turn retry at the same attempt budget, and discovery@k over seeds x problems (docs/ttsd.md).

Names are imported lazily: the configs (for the command line) do not pull in torch.
"""

from importlib import import_module

_EXPORTS = {
    "sdpo_fast.ttsd.config": ("METHODS", "SearchOptions", "TTSDConfig", "ExperimentConfig"),
    "sdpo_fast.ttsd.search": ("Searcher", "SearchResult", "run_ttsd"),
    "sdpo_fast.ttsd.problems": ("task_problems", "file_problem"),
    "sdpo_fast.ttsd.discovery": ("discovery_at_k", "discovery_table", "plot_discovery"),
    "sdpo_fast.ttsd.experiment": ("run_experiment",),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'sdpo_fast.ttsd' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
