"""Test-time self-distillation: SDPO on one problem until it is solved, against best-of-k sampling and
multi-turn retry at the same attempt budget, and discovery@k over seeds x problems (docs/ttsd.md).

Names are imported lazily: the configs (for the command line) do not pull in torch.
"""

from sdpo_fast.lazy import lazy_exports

_EXPORTS = {
    "sdpo_fast.ttsd.config": ("METHODS", "SearchOptions", "TTSDConfig", "ExperimentConfig"),
    "sdpo_fast.ttsd.search": ("Searcher", "SearchResult", "run_ttsd"),
    "sdpo_fast.ttsd.problems": ("task_problems", "file_problem"),
    "sdpo_fast.ttsd.discovery": ("discovery_at_k", "discovery_table", "plot_discovery"),
    "sdpo_fast.ttsd.experiment": ("run_experiment",),
}
__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
