"""Memory of a streaming process tree (the data benchmark's third comparison).

:func:`stream_memory` streams a dataset's train split once in a fresh subprocess and samples the
peak memory of its whole process tree (driver, Raylet, Ray workers).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path


def stream_memory(uri: str, crop: int, batch_size: int,
                  interval: float = 0.2) -> dict[str, float]:
    """Stream ``uri``'s train split once in a fresh subprocess; sample its process tree's memory.

    Returns:
        ``images`` streamed, ``idle_rss_mb`` (Ray up, stream built, nothing read yet),
        ``peak_rss_mb`` (sum of RSS over the tree: shared pages count in every process) and
        ``peak_pss_mb`` (proportional share; 0 where the kernel does not report it).
    """
    code = ("import sys; from segray.data.memprobe import stream_once; "
            "stream_once(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))")
    proc = subprocess.Popen([sys.executable, "-c", code, uri, str(crop), str(batch_size)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak = {"rss": 0, "pss": 0}
    idle = {"rss": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            rss, pss = process_tree_memory(proc.pid)
            peak["rss"], peak["pss"] = max(peak["rss"], rss), max(peak["pss"], pss)
            done.wait(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    images = 0
    for line in proc.stdout:
        if line.startswith("READY"):
            idle["rss"] = process_tree_memory(proc.pid)[0]
        elif line.startswith("IMAGES"):
            images = int(line.split()[1])
    proc.wait()
    done.set()
    thread.join()
    if proc.returncode != 0:
        raise RuntimeError(f"streaming {uri} in a subprocess failed (exit {proc.returncode})")
    mb = 2**20
    return {"images": images, "idle_rss_mb": idle["rss"] / mb, "peak_rss_mb": peak["rss"] / mb,
            "peak_pss_mb": peak["pss"] / mb}


def stream_once(uri: str, crop: int, batch_size: int) -> int:
    """Stream a dataset's train split once through the training pipeline (the memory probe).

    Prints ``READY`` once Ray is up and the stream is built, then ``IMAGES <n>`` at the end.
    """
    import ray

    from segray.data.manifest import open_dataset
    from segray.data.stream import train_collate, train_dataset

    ray.init(address="local", num_cpus=os.cpu_count() or 2, include_dashboard=False,
             log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    stream = train_dataset(open_dataset(uri), "train", crop=(crop, crop))
    print("READY", flush=True)
    n = 0
    for batch in stream.iter_torch_batches(batch_size=batch_size, collate_fn=train_collate,
                                           device="cpu"):
        n += len(batch["image"])
    print(f"IMAGES {n}", flush=True)
    ray.shutdown()
    return n


def process_tree_memory(pid: int) -> tuple[int, int]:
    """``(rss, pss)`` in bytes summed over ``pid`` and all its descendants (0, 0 if gone).

    Uses psutil when installed, else ``/proc`` (Linux). PSS is 0 where it cannot be read.
    """
    try:
        import psutil
    except ImportError:
        return _proc_tree_memory(pid)
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0, 0
    rss = pss = 0
    for p in procs:
        try:
            info = p.memory_full_info()
            rss, pss = rss + info.rss, pss + getattr(info, "pss", 0)
        except psutil.Error:
            continue
    return rss, pss


def _proc_tree_memory(pid: int) -> tuple[int, int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path("/proc", entry, "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the name in (...) may hold spaces
        children.setdefault(ppid, []).append(int(entry))
    page = os.sysconf("SC_PAGE_SIZE")
    rss = pss = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        todo.extend(children.get(p, []))
        try:
            rss += int(Path("/proc", str(p), "statm").read_text().split()[1]) * page
            for line in Path("/proc", str(p), "smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
    return rss, pss
