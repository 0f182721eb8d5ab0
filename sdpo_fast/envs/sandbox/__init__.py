"""Run model-written Python in a separate, locked-down process (see docs/environments.md, "The sandbox").

Modules, one per job:

- `process`: one run: start it, move its bytes under one deadline, read how it ended (`Sandbox`,
  `run_stdio`, `RunResult`);
- `support`: what isolation this machine allows, probed once (`isolation_support`);
- `jail`: what runs between fork and exec: namespaces, mounts, limits, uid, the run's init;
- `seccomp`: the syscall filter (built with libseccomp);
- `cgroup`: a memory cgroup per run;
- `slots`: sandbox uids (one per evaluator process) and the sweep of what a uid still runs.
"""

from sdpo_fast.envs.sandbox.limits import Limits, SandboxUnavailable
from sdpo_fast.envs.sandbox.process import RunResult, Sandbox, SandboxEnded, run_stdio
from sdpo_fast.envs.sandbox.slots import sweep_abandoned_slots
from sdpo_fast.envs.sandbox.support import Support, isolation_support

__all__ = ["Limits", "RunResult", "Sandbox", "SandboxEnded", "SandboxUnavailable", "Support",
           "isolation_support", "run_stdio", "sweep_abandoned_slots"]
