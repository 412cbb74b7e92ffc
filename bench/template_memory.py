"""How much memory the preloaded template process holds while it waits for training runs to fork.

    .venv/bin/python bench/template_memory.py

Starts the template the way a worker without a GPU does (worker/launcher.py: `warm_up`, then
`wait_until_ready`, which returns once its imports of torch, transformers, peft, trl and the recipes are
done) and reads the template's memory from /proc: its resident set (VmRSS), split into anonymous memory
and mapped files, and its proportional share (Pss), which counts pages it shares with other processes
(the runs it forks, this bench) in part.
"""

import os
from pathlib import Path

os.environ["TUNEFORGE_PRELOAD_TRAINING"] = "1"  # the template even where a GPU is present

from worker import launcher  # noqa: E402


def child_pids() -> list[int]:
    """The processes this one started, from every thread's /proc children list."""
    tasks = Path("/proc/self/task").iterdir()
    return [int(pid) for task in tasks for pid in (task / "children").read_text().split()]


def template_pid() -> int:
    """The forkserver this process started: the template training processes fork from."""
    for pid in child_pids():
        if b"forkserver" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return pid
    raise RuntimeError("no forkserver child: is TUNEFORGE_PRELOAD_TRAINING honoured?")


def memory_mb(path: Path, fields: tuple[str, ...]) -> dict[str, float]:
    """`fields` of a /proc status or smaps_rollup file, in MB."""
    values = {}
    for line in path.read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in fields:
            values[name] = int(rest.split()[0]) / 1024  # kB
    return values


def main() -> None:
    launcher.warm_up()
    launcher.wait_until_ready()
    pid = template_pid()
    status = memory_mb(Path(f"/proc/{pid}/status"), ("VmRSS", "RssAnon", "RssFile", "RssShmem"))
    rollup = memory_mb(Path(f"/proc/{pid}/smaps_rollup"), ("Pss",))
    print(f"template process {pid}, imports: {', '.join(launcher.PRELOAD)}")
    print(f"resident (VmRSS)      {status['VmRSS']:7.1f} MB")
    print(f"  anonymous (RssAnon) {status['RssAnon']:7.1f} MB")
    print(f"  files (RssFile)     {status['RssFile']:7.1f} MB")
    print(f"proportional (Pss)    {rollup['Pss']:7.1f} MB")


if __name__ == "__main__":
    main()
